#!/usr/bin/env bash
# Install CultureMERT and its dependencies into the active Python environment (venv or conda).
#
#   python3 -m venv .venv && source .venv/bin/activate && bash scripts/install.sh
#
# Order matters:
#   1. torch first. An environment that already has torch (e.g. a CUDA build) keeps it;
#      otherwise torch==2.13.0 is installed (on the CPU machines of this project it is a local
#      wheel; elsewhere pip fetches the default build for your platform).
#   2. fairseq-fixed is compiled against that torch (--no-build-isolation, torch pinned by a
#      constraint), so pip never pulls a second, multi-GB torch into a build environment.
#   3. torchaudio comes in as a declared dependency of fairseq-fixed and encodec but is never
#      used (audio I/O is soundfile + soxr); a torchaudio that cannot load beside this torch
#      breaks `import transformers`, so it is removed when it does not import.
set -euo pipefail

PYTHON=${PYTHON:-python}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

in_env=$("$PYTHON" -c 'import os, sys; print(int(sys.prefix != sys.base_prefix or "CONDA_PREFIX" in os.environ))')
if [[ "$in_env" != 1 && "${CULTUREMERT_ALLOW_SYSTEM_PYTHON:-0}" != 1 ]]; then
    echo "install.sh: no virtual environment is active. Create one first:" >&2
    echo "  python3 -m venv .venv && source .venv/bin/activate && bash scripts/install.sh" >&2
    echo "(or set CULTUREMERT_ALLOW_SYSTEM_PYTHON=1 to install into $("$PYTHON" -c 'import sys; print(sys.prefix)'))" >&2
    exit 1
fi

pip() { "$PYTHON" -m pip "$@"; }

pip install --quiet --upgrade pip  # older pips lack editable installs of pyproject projects

echo "== [1/4] torch"
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    pip install "torch==${CULTUREMERT_TORCH_VERSION:-2.13.0}"
fi
torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)')
echo "using torch $torch_version"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"

echo "== [2/4] build tools for fairseq-fixed's extensions"
pip install -c "$constraints" "setuptools>=68" wheel "cython>=3" "numpy>=1.24"

echo "== [3/4] culturemert, fairseq-fixed and the other dependencies"
pip install -c "$constraints" --no-build-isolation -e "$here[dev]"

# tinysoundfont renders the offline test and demo music; its only declared dependency, pyaudio
# (live playback, never used here), needs portaudio headers to build, hence --no-deps.
pip install --no-deps "tinysoundfont==0.3.7"

echo "== [4/4] checks"
if ! "$PYTHON" -c 'import torchaudio' 2>/dev/null; then
    echo "removing torchaudio: it does not load beside torch $torch_version and is not needed"
    pip uninstall -y torchaudio
fi
"$PYTHON" - <<'PY'
import fairseq, torch, transformers, nnAudio, sklearn, soundfile, soxr, hydra, wandb, tinysoundfont
import culturemert
from culturemert.compat import import_encodec
from fairseq.models import MODEL_REGISTRY

import_encodec()
assert "mert" in MODEL_REGISTRY, "culturemert did not register the fairseq model 'mert'"
print(f"culturemert ready: torch {torch.__version__} (CUDA: {torch.cuda.is_available()}), "
      f"fairseq {fairseq.__version__}, transformers {transformers.__version__}")
PY
