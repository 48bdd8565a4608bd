"""Run every benchmark and print one table of their figures (issue #7).

Each benchmark of this folder runs as a child process, one after another so that they do not
compete for the machine; the tables they print are parsed into rows of (benchmark, setting,
figure, unit, device):

- train_step.py: seconds per MERT-v1-95M update and peak memory (RSS; CUDA when a GPU is present)
  of each training option (default, activation checkpointing, bf16);
- extract_features.py: clips per second of MertModel.hidden_states and of transformers' HubertModel;
- extract_tokens.py: audio seconds encoded per wall second, token cache size per audio hour;
- merge.py: time and peak RSS of merging four MERT-v1-95M-sized models.

By default each runs with modest settings, so that all take about 5 minutes on 2 CPU cores;
--full uses each benchmark's own defaults. A benchmark that fails, or prints nothing this script
can read, gets a row with its error line, and the script exits with status 1.

The figures of a busy machine are not comparable with those of an idle one, so the load average
is printed. On a shared machine, --threads 1 (OMP_NUM_THREADS for every benchmark) keeps torch's
threads from waiting on each other: measured here with 2 cores at a load of 2 to 3, token
extraction ran at 8.0 audio s per wall s with 1 thread and at 1.8 with torch's default of 2.

    python benchmarks/run_all.py [--full] [--threads 1] [--only train_step,merge]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = ("benchmark", "setting", "figure", "unit", "device")
Figure = tuple[str, str, str, str]  # setting, figure, unit, device
DEVICES = ("cpu", "cuda")
MAX_ERROR_CHARS = 200
MACHINE = """
import json, os, torch
print(json.dumps({
    "cpus": os.cpu_count(),
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
}))
"""


def error_line(text: str) -> str:
    """The last line of a failed run's output that mentions an error (an exception, an argparse
    message), else its last line; shortened to `MAX_ERROR_CHARS`."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    line = (errors or lines or ["no output"])[-1]
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def describe_machine(env: dict[str, str]) -> str:
    """CPU count, torch version and threads, and the CUDA device, read by a child process so that
    this one neither imports torch nor holds a CUDA context while the benchmarks run."""
    result = subprocess.run([sys.executable, "-c", MACHINE], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return f"{os.cpu_count()} CPUs, torch unavailable ({error_line(result.stderr)})"
    info = json.loads(result.stdout)
    return (
        f"{info['cpus']} CPUs, torch {info['torch']} (torch threads: {info['threads']}), "
        f"CUDA device: {info['cuda'] or 'none'}"
    )


def device_rows(output: str, fields: int) -> list[list[str]]:
    """The whitespace-separated fields of the output lines that start with a device name and have
    `fields` fields: the rows of a benchmark's table."""
    rows = [line.split() for line in output.splitlines()]
    return [row for row in rows if len(row) == fields and row[0] in DEVICES]


def parse_train_step(output: str) -> list[Figure]:
    """Rows 'device batch option precision targets s/step peak-RSS-GiB peak-CUDA-GiB' ('-' without
    CUDA)."""
    figures = []
    for device, batch, option, precision, targets, seconds, rss, cuda in device_rows(output, 8):
        setting = f"batch {batch} x 5 s {precision}, {option}, {targets.replace('_', '-')} codes"
        figures += [(setting, seconds, "s per update", device), (setting, rss, "GiB peak RSS", device)]
        if cuda != "-":
            figures.append((setting, cuda, "GiB peak CUDA memory", device))
    return figures


def parse_extract_features(output: str) -> list[Figure]:
    """Rows 'device culturemert-clips/s transformers-clips/s ratio' under a '..., batch N, ...' header."""
    batch = re.search(r"\bbatch \d+", output)
    clips = f"{batch[0] if batch else 'batch ?'} x 5 s"
    figures = []
    for device, ours, theirs, ratio in device_rows(output, 4):
        figures += [
            (f"{clips}, culturemert", ours, "clips/s", device),
            (f"{clips}, transformers", theirs, "clips/s", device),
            ("culturemert / transformers", ratio, "speed ratio", device),
        ]
    return figures


def parse_extract_tokens(output: str) -> list[Figure]:
    """Rows 'device wall-s audio-s/wall-s measured-MB/audio-h' under a '..., S s of audio' header."""
    seconds = re.search(r"([\d.]+) s of audio", output)
    music = f"{seconds[1] if seconds else '?'} s of music"
    figures = []
    for device, _, speed, size in device_rows(output, 4):
        figures += [
            (music, speed, "audio s per wall s", device),
            ("token cache", size, "MB per audio hour", device),
        ]
    return figures


def parse_merge(output: str) -> list[Figure]:
    """Rows 'method 12.3s 850 MiB 2.34x'; merging runs on the CPU."""
    figures = []
    for method, seconds, peak, mib, ratio in (
        row for row in map(str.split, output.splitlines()) if len(row) == 5
    ):
        if seconds.endswith("s") and mib == "MiB" and ratio.endswith("x"):
            setting = f"4 x MERT-v1-95M, {method}"
            figures += [
                (setting, seconds.removesuffix("s"), "s", "cpu"),
                (setting, peak, "MiB peak RSS", "cpu"),
                (setting, ratio.removesuffix("x"), "x checkpoint size", "cpu"),
            ]
    return figures


@dataclass(frozen=True)
class Benchmark:
    script: str  # benchmarks/<script>.py
    title: str
    quick: tuple[str, ...]  # the arguments of the modest default run
    parse: Callable[[str], list[Figure]]


BENCHMARKS = (
    Benchmark(
        "train_step", "train step", ("--steps", "1", "--options", "default,checkpointing"), parse_train_step
    ),
    Benchmark(
        "extract_features", "feature extraction", ("--batch", "2", "--repeats", "3"), parse_extract_features
    ),
    Benchmark("extract_tokens", "token extraction", ("--seconds", "30"), parse_extract_tokens),
    Benchmark("merge", "merge", ("--methods", "task_arithmetic"), parse_merge),
)


def run(
    benchmark: Benchmark, full: bool, env: dict[str, str], timeout: float
) -> tuple[list[tuple[str, ...]], bool]:
    """Run one benchmark: its table rows, and whether it succeeded."""
    command = [sys.executable, str(HERE / f"{benchmark.script}.py"), *(() if full else benchmark.quick)]
    print(f"running {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [(benchmark.title, "FAILED", f"no result within {timeout:.0f} s", "", "")], False
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if result.returncode != 0:
        failure = (error_line(result.stderr + result.stdout), f"exit status {result.returncode}")
        return [(benchmark.title, "FAILED", *failure, "")], False
    figures = benchmark.parse(result.stdout)
    if not figures:
        return [(benchmark.title, "FAILED", "no figures found in its output", "", "")], False
    return [(benchmark.title, *figure) for figure in figures], True


def table(rows: list[tuple[str, ...]]) -> str:
    """A Markdown table with aligned columns."""
    widths = [max(len(row[column]) for row in [COLUMNS, *rows]) for column in range(len(COLUMNS))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([line(COLUMNS), line(tuple("-" * width for width in widths)), *map(line, rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--full", action="store_true", help="each benchmark's own default settings")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the benchmarks (default: torch's)")
    parser.add_argument("--only", help="comma-separated benchmark scripts to run (default: all)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one benchmark may take")
    args = parser.parse_args()
    scripts = [benchmark.script for benchmark in BENCHMARKS]
    chosen = scripts if args.only is None else args.only.split(",")
    unknown = sorted(set(chosen) - set(scripts))
    if unknown:
        parser.error(f"unknown benchmarks {', '.join(unknown)}; choose from {', '.join(scripts)}")

    env = {**os.environ, **({} if args.threads is None else {"OMP_NUM_THREADS": str(args.threads)})}
    machine = describe_machine(env)
    load = os.getloadavg()[0]
    rows, failed = [], []
    for benchmark in BENCHMARKS:
        if benchmark.script in chosen:
            benchmark_rows, ok = run(benchmark, args.full, env, args.timeout)
            rows += benchmark_rows
            failed += [] if ok else [benchmark.script]

    settings = (
        "--full: each benchmark's defaults" if args.full else "quick (--full: each benchmark's defaults)"
    )
    print(f"machine: {machine}; load average {load:.1f} before the benchmarks")
    print(f"settings: {settings}")
    print(table(rows))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
