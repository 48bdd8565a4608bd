"""Time and peak memory of merging four MERT-v1-95M-sized models (thesis 3.4, 4.4; issue #5).

Writes a randomly initialised MERT-v1-95M (95,550,160 parameters) as the base and four perturbed
copies as fairseq checkpoints, then runs ``scripts/merge.py --similarity`` (lambda 0.2) once per
method, each in a fresh process, and prints its wall time and peak RSS (the child's
``ru_maxrss``) beside one checkpoint's file size. The target is a peak of at most 3x that size.
For scale, the peak RSS of a process that only imports ``culturemert.merging`` is printed too.

A child's ``ru_maxrss`` starts from its parent's RSS at the fork, so this process stays small:
it imports neither torch nor culturemert, and the checkpoints are written by a child of their own.

python benchmarks/merge.py [--methods task_arithmetic,ties,dare] [--workdir DIR]

The children run with OMP_NUM_THREADS=1 unless it is set: the merge streams memory-bound,
element-wise work that gains little from torch's intra-op threads, and on a shared machine with
more busy threads than cores those threads slow it down several-fold.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = 4
WRITE_INPUTS = """
import sys, torch
from culturemert.checkpoint import save_fairseq
from culturemert.models.mert import MertConfig, MertModel

torch.manual_seed(0)
cfg = MertConfig()
base = MertModel(cfg).state_dict()
save_fairseq(sys.argv[1], cfg, base)
for path in sys.argv[2:]:  # independent Gaussian task vectors, std 1e-3
    save_fairseq(path, cfg, {name: value + 1e-3 * torch.randn_like(value) for name, value in base.items()})
"""


def measure(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in MiB of ``command`` run as a child process (which must succeed)."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="task_arithmetic,ties,dare", help="comma-separated methods")
    parser.add_argument("--workdir", type=Path, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, OMP_NUM_THREADS={threads}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        base, *models = [folder / "base.pt"] + [folder / f"culture{i}.pt" for i in range(MODELS)]
        seconds, _ = measure([sys.executable, "-c", WRITE_INPUTS, str(base), *map(str, models)])
        size = base.stat().st_size / 2**20
        print(f"wrote {1 + MODELS} checkpoints of {size:.1f} MiB in {seconds:.1f}s")
        _, imports = measure([sys.executable, "-c", "import culturemert.merging"])
        print(f"import culturemert.merging alone: peak RSS {imports:.0f} MiB ({imports / size:.2f}x)")
        print(f"{'method':<16} {'time':>7} {'peak RSS':>10} {'/ checkpoint':>13}")
        for method in args.methods.split(","):
            command = [sys.executable, str(REPO / "scripts" / "merge.py"), "--base", str(base), "--models"]
            command += [*map(str, models), "--out", str(folder / method), "--method", method, "--similarity"]
            seconds, peak = measure(command)
            print(f"{method:<16} {seconds:6.1f}s {peak:7.0f} MiB {peak / size:12.2f}x")


if __name__ == "__main__":
    main()
