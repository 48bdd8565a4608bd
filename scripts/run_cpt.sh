#!/usr/bin/env bash
# Two-stage continual pre-training of MERT for one run (thesis 3.3); see culturemert/cli/run_cpt.py
# for the environment variables (bash scripts/run_cpt.sh --help).
#
#   bash scripts/run_cpt.sh <run> [hydra overrides...]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# the active environment's interpreter: python where it exists, else python3 (images with only python3)
python=$(command -v python || command -v python3) || { echo "run_cpt.sh: no python or python3 on PATH" >&2; exit 2; }
exec "$python" -m culturemert.cli.run_cpt "$@"
