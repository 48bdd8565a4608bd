"""benchmarks/gpu_check.py --cpu-tiny: the GPU check's whole path at test size on the CPU.

A release-layout start checkpoint, generated music, token caches through
``scripts/extract_tokens.py``, both stages through ``bash scripts/run_cpt.sh`` (real
``fairseq-hydra-train``), the training options and the extraction comparison. No figure is
compared with a time: the test checks that every row is printed and every logged loss was
finite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO

NUMBER = r"-?\d+\.\d+"


def test_cpu_tiny_check_prints_every_row_with_finite_losses(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-tiny", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:] + (tmp_path / "gpu_check.log").read_text()[-3000:]
    lines = result.stdout.splitlines()

    def row(label: str) -> str:
        found = [line for line in lines if line.startswith(label)]
        assert len(found) == 1, f"no single row {label!r} in:\n{result.stdout}"
        return found[0]

    for stage in ("stage 1", "stage 2"):
        # updates/s, audio s/s, no CUDA memory on the CPU, finite losses, FP32 on the CPU
        assert re.fullmatch(rf"{stage}\s+{NUMBER}\s+{NUMBER}\s+-\s+finite\s+fp32", row(stage)), row(stage)
    for option, precision in (("default", "FP32"), ("checkpointing", "FP32"), ("bf16", "BF16")):
        fields = row(option).split()
        assert fields[:2] == [option, precision]
        assert float(fields[2]) > 0 and float(fields[3]) > 0 and int(fields[4].lstrip(">=")) >= 0
    ours, theirs, ratio, difference, pooled = map(float, row("float32 ").split()[1:])
    assert ours > 0 and theirs > 0 and ratio > 0
    # the exported folder holds the trained weights MertModel reads
    assert difference < 1e-4 and pooled < 1e-4
    for stage in (1, 2):
        assert (tmp_path / "runs" / "gpu_check" / f"stage{stage}" / "checkpoint_last.pt").is_file()
