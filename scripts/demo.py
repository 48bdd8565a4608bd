"""A miniature of the thesis on real music that installs offline (make demo).

    python scripts/demo.py [--out runs/demo] [--encodec weights/encodec_24khz-d7cc33bc.th]

A "Western" source domain (rendered Bach chorales and Palestrina masses) pre-trains a tiny MERT
from scratch, standing in for MERT-v1. Two "target cultures" (rendered fiddle reels, jigs and
hornpipes; Essen folk songs) are each learned by two-stage continual pre-training with Western
replay in stage 1, and so is their mix; the two single-culture models are merged by task
arithmetic over a lambda sweep; every model is probed on a source and two target tagging tasks;
a Table 4.1-style table and the plots are printed and written. Every step runs the scripts a
researcher runs on real data. Without --encodec the acoustic teacher is an untrained EnCodec
whose codebooks are initialised from the Western audio (a random-projection quantiser, as in
BEST-RQ and MusicFM), not the published codec. Each step is skipped when its output exists, so
an interrupted demo resumes.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from culturemert.cli import configure_logging
from culturemert.cli import run as run_cli

REPO = Path(__file__).resolve().parents[1]
SOURCE = {"bach": 30, "palestrina": 30}  # pieces rendered per collection
TARGETS = {"fiddle": 60, "essen": 60}
PIECE_SECONDS = 8.0
SPLIT_SHARES = (("train", 0.6), ("valid", 0.2), ("test", 0.2))
TAG_FIELDS = ("collection", "tune_type", "region", "instrument", "tempo")
LAMBDAS = "0.2,0.5,1.0"
# Tiny models trained for minutes vary little between recordings: the probe z-scores features.
PROBE_FLAGS = [
    "--layer", "all", "--seeds", "2", "--lrs", "1e-3", "--max-epochs", "40", "--threads", "1", "--standardize"
]  # fmt: skip

started = time.monotonic()


def step(message: str) -> None:
    print(f"\n[demo {time.monotonic() - started:6.0f} s] {message}", flush=True)


LOGS: Path | None = None  # the folder of the tools' full output, set by main


def run(*command: str | Path, env: dict[str, str] | None = None) -> None:
    """Run one of the project's command-line tools with its output (fairseq's per-update lines
    included) going to a log file under ``<out>/logs/``; stop the demo, showing the log's end,
    if it fails."""
    command = [str(part) for part in command]
    log = LOGS / f"{len(list(LOGS.glob('*.log'))):02d}-{Path(command[1]).stem}.log"
    print("  $", " ".join(command), f"  (log: {log})", flush=True)
    with open(log, "w") as handle:
        result = subprocess.run(
            command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=handle, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        print("".join(log.read_text().splitlines(keepends=True)[-30:]), file=sys.stderr)
        sys.exit(f"demo: step failed (exit {result.returncode}): {' '.join(command)}; full output in {log}")


def run_in_process(tool: str, *arguments: str | Path) -> None:
    """Run ``culturemert.cli.<tool>``'s ``main`` in this process: the same command line as
    ``python scripts/<tool>.py`` without paying the start-up of a new Python with torch and
    fairseq, for the many short probing calls."""
    arguments = [str(argument) for argument in arguments]
    print(f"  $ python scripts/{tool}.py", " ".join(arguments), flush=True)
    module = importlib.import_module(f"culturemert.cli.{tool}")
    if run_cli(module.main, tool, arguments) != 0:
        sys.exit(f"demo: step failed: scripts/{tool}.py {' '.join(arguments)}")


def render(audio_root: Path, collections: dict[str, int], seed: int) -> list[tuple[Path, dict]]:
    """Render the pieces of `collections` into `audio_root/<collection>/` (deterministic, and
    quick: about a second per rendered minute) and return them with their tags."""
    from culturemert.music_corpus import render_collection

    return [
        piece
        for name, count in collections.items()
        for piece in render_collection(name, audio_root / name, count, seed=seed, max_seconds=PIECE_SECONDS)
    ]


def write_splits(pieces: list[tuple[Path, dict]], root: Path, name: str, seed: int) -> tuple[Path, Path]:
    """A `path,split` CSV for data preparation and a `path,split,tags` probing task, per domain."""
    order = list(range(len(pieces)))
    random.Random(f"{name}/{seed}").shuffle(order)
    splits, start = {}, 0
    for split, share in SPLIT_SHARES:
        count = round(share * len(pieces)) if split != "test" else len(pieces) - start
        for index in order[start : start + count]:
            splits[index] = split
        start += count
    split_csv, task_csv = root / f"{name}_split.csv", root / f"{name}.csv"
    with open(split_csv, "w", newline="") as split_file, open(task_csv, "w", newline="") as task_file:
        split_rows, task_rows = csv.writer(split_file), csv.writer(task_file)
        split_rows.writerow(["path", "split"])
        task_rows.writerow(["path", "split", "tags"])
        for index, (path, tags) in enumerate(pieces):
            relative = path.relative_to(root / "audio")
            labels = [f"{field}={tags[field]}" for field in TAG_FIELDS if field in tags]
            split_rows.writerow([relative, splits[index]])
            task_rows.writerow([relative, splits[index], "|".join(labels)])
    return split_csv, task_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--encodec", type=Path, help="the published EnCodec 24 kHz weights (optional)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    out = args.out.resolve()
    global LOGS
    LOGS = out / "logs"
    LOGS.mkdir(parents=True, exist_ok=True)
    audio, data, cpt, probes = out / "audio", out / "data", out / "cpt", out / "probe"
    python = sys.executable
    print(
        "CultureMERT demo: tiny models (2 layers, 128 wide), 1 s crops, batches of 2, tens of updates "
        "per stage and learning rates far above the thesis's (configs/preset/tiny.yaml, "
        "configs/cpt/demo_stage*.yaml, configs/demo/). The figures show the method's mechanics, "
        "not the thesis's results."
    )

    step("1/8 rendering real music offline (music21 scores through a General-MIDI soundfont)")
    domains = {"western": render(audio, SOURCE, args.seed)}
    for name, count in TARGETS.items():
        domains[name] = render(audio, {name: count}, args.seed)
    split_csvs, task_csvs = {}, {}
    for name, pieces in domains.items():
        split_csvs[name], task_csvs[name] = write_splits(pieces, out, name, args.seed)
    for name, pieces in domains.items():
        print(f"  {name}: {len(pieces)} pieces of up to {PIECE_SECONDS:.0f} s -> {task_csvs[name]}")

    step("2/8 data preparation: training-split segments and manifests (scripts/prepare_data.py)")
    runs = {"source": ["western"], "fiddle": ["fiddle"], "essen": ["essen"], "mix": ["fiddle", "essen"]}
    for run_name, cultures in runs.items():
        if (data / run_name / "provenance.json").exists():
            continue
        command = [python, "scripts/prepare_data.py", "--run", f"configs/demo/data_{run_name}.yaml"]
        command += ["--out", data, "--name", run_name, "--seed", str(args.seed)]
        for culture in cultures:
            command += ["--culture", f"{culture}={audio}"]  # the split CSV names its files
            command += ["--split", f"{culture}={split_csvs[culture]}"]
        if run_name != "source":
            command += ["--replay", audio, "--split", f"replay={split_csvs['western']}"]
        run(*command)

    step("3/8 acoustic teacher and token caches (scripts/extract_tokens.py)")
    teacher = args.encodec or out / "teacher.th"
    if not teacher.exists():
        run(
            python, "scripts/extract_tokens.py", "--manifest", data / "source/stage2/train.tsv",
            "--from-data-seed", str(args.seed), "--save-teacher", teacher,
            "--out", data / "source/tokens/stage2/train",
        )  # fmt: skip

    step("4/8 pre-training the source model from scratch (stands in for MERT-v1; scripts/run_cpt.sh)")
    common = {"PRESET": "tiny", "ENCODEC": str(teacher), "CPT_OUT": str(cpt)}
    source_env = {"NAME": "source", "MANIFESTS": str(data / "source"), "ABLATION": "single_stage_rewarm"}
    run(
        "bash", "scripts/run_cpt.sh", "demo", "optimization.max_update=150", "optimization.lr=[2e-3]",
        env={**common, **source_env},
    )  # fmt: skip
    base = cpt / "source" / "stage2" / "checkpoint_last.pt"

    step("5/8 two-stage continual pre-training per target culture and for their mix")
    for run_name in ("fiddle", "essen", "mix"):
        run(
            "bash", "scripts/run_cpt.sh", "demo",
            env={**common, "NAME": run_name, "MANIFESTS": str(data / run_name), "INIT": str(base)},
        )  # fmt: skip

    step(f"6/8 task arithmetic: merging the fiddle and essen models, lambda in {LAMBDAS} (scripts/merge.py)")
    merged = out / "merged"
    if not (merged / f"lambda_{LAMBDAS.split(',')[-1]}" / "checkpoint.pt").exists():
        run(
            python, "scripts/merge.py", "--base", base, "--models",
            cpt / "fiddle/stage2/checkpoint_last.pt", cpt / "essen/stage2/checkpoint_last.pt",
            "--out", merged, "--sweep", LAMBDAS, "--similarity",
        )  # fmt: skip

    step("7/8 probing every model on the source and target tagging tasks (scripts/probe.py)")
    models = {"source": base, "fiddle-cpt": cpt / "fiddle/stage2/checkpoint_last.pt"}
    models |= {
        "essen-cpt": cpt / "essen/stage2/checkpoint_last.pt",
        "mix-cpt": cpt / "mix/stage2/checkpoint_last.pt",
    }
    for value in LAMBDAS.split(","):
        models[f"TA lambda_{value}"] = merged / f"lambda_{value}" / "checkpoint.pt"
    for model_name, checkpoint in models.items():
        for task, task_csv in task_csvs.items():
            slug = model_name.replace(" ", "_")
            features, run_dir = probes / "features" / slug / task, probes / "runs" / slug / task
            if not (run_dir / "results.json").exists():
                run_in_process(
                    "probe", "extract", "--model", checkpoint, "--task", task_csv,
                    "--audio-root", audio, "--out", features, "--name", model_name, "--no-progress",
                )  # fmt: skip
                run_in_process("probe", "fit", "--features", features, "--out", run_dir, *PROBE_FLAGS)

    step("8/8 report: Table 4.1-style ROC-AUC / AP, transfer and lambda-sweep plots")
    run_in_process("probe", "report", probes / "runs", "--out", out / "report", "--base", "source")
    print(
        "What to look for: continual pre-training on a target should raise that target's scores over "
        "'source' (adaptation) and may lower 'western' (forgetting); merging by task arithmetic trades "
        "the two with lambda. In a miniature this small (12 test tracks per task, 2 seeds) many "
        "differences stay within the spread over seeds; the mechanics, not the effect sizes, are what "
        f"it shows. Plots: {out / 'report'}; task-vector similarity: {merged}. "
        f"Total time: {time.monotonic() - started:.0f} s."
    )


if __name__ == "__main__":
    main()
