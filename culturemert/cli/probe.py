"""Probe frozen MERT models on music tagging tasks (thesis 3.5.2, App. A.2): extract features,
fit probes, report.

python scripts/probe.py extract --model weights/MERT-v1-95M_fairseq.pt --task makam \\
    --metadata dunya/makam_metadata.json --audio-root /data/makam \\
    --out features/MERT-v1-95M/makam
python scripts/probe.py extract --model runs/tiny.pt --task tags.csv --audio-root /data/x --out feats/tiny/x
python scripts/probe.py fit --features features/MERT-v1-95M/makam --layer 6 --out probes/MERT-v1-95M/makam/6
python scripts/probe.py fit --features features/MERT-v1-95M/fma --layer all --out probes/MERT-v1-95M/fma/all
python scripts/probe.py report probes/ --base MERT-v1-95M --out reports/probing

Tasks: makam, hindustani, carnatic (tags from --metadata: a JSON object id -> tags, or id,tags
CSV/TSV rows with tags separated by |), lyra, fma, magnatagatune (--metadata: the folder with the
minzwon train.npy and binary.npy), on the published splits shipped with the package (or
--splits-root), or a CSV task file of path,split,tags rows.
Audio files are found under --audio-root by recording id.
The report command writes Tables 4.1/4.2 (table.md) and Figures 4.2, 4.4 and 4.7 of the best layer
per model and task, with 95 % bootstrap intervals over test tracks where the runs saved predictions.
Extraction resumes where an interrupted run stopped, and a second extraction into the same --out
is refused while one runs; --skip-bad drops (and records) recordings whose audio is corrupt,
truncated or shorter than the model's receptive field. Exits with status 2 and a one-line message
on bad inputs, option values out of range included, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path

import torch

from culturemert.cli import command
from culturemert.data.splits import DEFAULT_SPLITS_ROOT
from culturemert.errors import UserError, listing
from culturemert.files import writing
from culturemert.probing.bootstrap import RESAMPLES
from culturemert.probing.chunking import WINDOW_SECONDS
from culturemert.probing.feature_cache import FeatureCache, FeatureCacheError
from culturemert.probing.features import BATCH_SIZE, PART_RECORDINGS, extract_features
from culturemert.probing.precision import PRECISIONS
from culturemert.probing.probe import ALL_LAYERS, ProbeConfig, ProbeError, fit_probe, write_run
from culturemert.probing.report import write_report
from culturemert.probing.runs import ReportError
from culturemert.probing.tasks import find_audio, load_task, present_rows

logger = logging.getLogger("probe")
PROBE = ProbeConfig()
# The numeric options of each command: the least value allowed, or the value to exceed (ABOVE);
# an option not given (None) is not checked.
AT_LEAST = {
    "extract": {"--max-seconds": 0, "--batch-size": 1, "--part-recordings": 1, "--workers": 0, "--top-k": 1},
    "fit": {
        "--seeds": 1,
        "--max-epochs": 1,
        "--batch-size": 1,
        "--lr-patience": 0,
        "--early-stopping-patience": 0,
        "--threads": 1,
    },
    "report": {"--resamples": 1},
}
ABOVE = {"extract": {"--window-seconds": 0}, "fit": {"--lrs": 0}}
ERRORS: dict[str, type[UserError]] = {"extract": FeatureCacheError, "fit": ProbeError, "report": ReportError}


def check_options(args: argparse.Namespace) -> None:
    """Refuse a numeric option outside its range (`AT_LEAST`, `ABOVE`) or not finite, before any
    work, in one line naming it."""
    error = ERRORS[args.command]
    for limits, strict in ((AT_LEAST, False), (ABOVE, True)):
        for option, bound in limits.get(args.command, {}).items():
            value = getattr(args, option[2:].replace("-", "_"))
            for item in value if isinstance(value, list) else [value]:
                allowed = item is None or math.isfinite(item) and (item > bound if strict else item >= bound)
                if not allowed:
                    raise error(f"{option} {item:g}: must be {'above' if strict else 'at least'} {bound}")


def check_out(out: Path, error: type[UserError]) -> None:
    """Refuse an --out folder that is a file or lies under one, before any work."""
    for folder in (out, *out.parents):
        if folder.is_dir():
            return
        if folder.exists():
            where = "is a file" if folder == out else f"lies under the file {folder}"
            raise error(f"--out {out} {where}; choose a folder")


def extract(args: argparse.Namespace) -> None:
    check_out(args.out, FeatureCacheError)
    with writing(args.out):
        _extract(args)


def _extract(args: argparse.Namespace) -> None:
    task = load_task(args.task, args.splits_root, args.metadata, args.top_k, trust_pickle=args.trust_pickle)
    if args.max_seconds is not None:
        task = dataclasses.replace(task, max_seconds=args.max_seconds or None)
    skipped: list[str] = []
    if args.skip_missing:
        rows, skipped = present_rows(task, args.audio_root)
        if skipped:
            logger.warning("skipping %d recordings without audio: %s", len(skipped), listing(skipped))
        task = task.select(rows)
    files = find_audio(task, args.audio_root)
    out = extract_features(
        task,
        files,
        args.model,
        args.out,
        normalize=args.normalize,
        model_name=args.name,
        batch_size=args.batch_size,
        part_recordings=args.part_recordings,
        device=args.device,
        precision=args.precision,
        workers=args.workers,
        window_seconds=args.window_seconds,
        skipped=skipped,
        progress=not args.no_progress,
        skip_bad=args.skip_bad,
        trust_checkpoint=args.trust_checkpoint,
    )
    meta = FeatureCache.open(out).meta
    if meta["skipped_bad_audio"]:
        bad = meta["skipped_bad_audio"]
        logger.warning("skipped %d recordings with unusable audio: %s", len(bad), bad[0]["reason"])
    print(
        f"wrote {out}: {meta['chunks']} chunks of {len(meta['ids'])} recordings, {meta['layers']} layers x "
        f"{meta['dim']}, {len(meta['tags'])} tags, model {meta['model']}, normalize={meta['normalize']}"
    )


def _layer(value: str) -> int | str:
    if value == ALL_LAYERS:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a layer number or {ALL_LAYERS!r}") from None


def fit(args: argparse.Namespace) -> None:
    check_out(args.out, ProbeError)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = FeatureCache.open(args.features)
    config = dataclasses.replace(
        PROBE,
        batch_size=args.batch_size,
        max_epochs=args.max_epochs,
        lr_patience=args.lr_patience,
        early_stopping_patience=args.early_stopping_patience,
        learning_rates=tuple(args.lrs),
        seeds=args.seeds,
        standardize=args.standardize,
    )
    results, predictions = fit_probe(cache, args.layer, config, args.device, args.name, not args.no_progress)
    out = write_run(args.out, results, predictions)
    mean, std = results["mean"], results["std"]
    scores = ", ".join(
        f"{key} {100 * mean[key]:.1f} ± {100 * std[key]:.1f}"
        for key in ("roc_auc", "ap", "micro_f1", "macro_f1")
    )
    run = f"{results['model']} {results['task']} layer {results['layer']}"
    print(f"wrote {out}: {run}: {scores} (lr {results['lr']:g})")


def report(args: argparse.Namespace) -> None:
    written = write_report(args.runs, args.out, args.base, args.resamples)
    print(written["table"].read_text())
    print("wrote " + ", ".join(str(path) for path in written.values()))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("extract", help="frozen-model chunk features of a task into a cache folder")
    p.add_argument("--model", required=True, type=Path, help="fairseq .pt or HF folder")
    p.add_argument("--task", required=True, help="built-in task name or CSV task file")
    p.add_argument("--audio-root", required=True, type=Path, help="folder holding the task's audio")
    p.add_argument("--out", required=True, type=Path, help="cache folder to write (or resume)")
    p.add_argument(
        "--splits-root",
        type=Path,
        default=DEFAULT_SPLITS_ROOT,
        help="built-in tasks: the folder of split folders (default: the published splits shipped)",
    )
    p.add_argument(
        "--metadata", type=Path, help="tags: JSON {id: [tags]} or id,tags CSV/TSV; magnatagatune's folder"
    )
    p.add_argument(
        "--trust-pickle", action="store_true", help="allow pickled .npy metadata/splits (trusted files only)"
    )
    p.add_argument(
        "--trust-checkpoint", action="store_true", help="allow any pickled type in a .pt you trust"
    )
    p.add_argument("--top-k", type=int, help="CSV tasks: keep the k most frequent training tags")
    p.add_argument(
        "--normalize", action="store_true", help="zero-mean unit-variance waveforms (MERT processor)"
    )
    p.add_argument(
        "--name", help="model name recorded for reports (default: the checkpoint's stem, or parent/folder)"
    )
    p.add_argument("--max-seconds", type=float, help="override the task's duration cut (0: none)")
    p.add_argument("--window-seconds", type=float, default=WINDOW_SECONDS, help="chunk length")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="chunks per model call")
    p.add_argument(
        "--part-recordings", type=int, default=PART_RECORDINGS, help="recordings per resumable part"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="float32",
        help="the model's arithmetic; bfloat16 and float16 are autocast on CUDA, recorded in the cache",
    )
    p.add_argument("--workers", type=int, default=0, help="audio decoding processes")
    p.add_argument("--skip-missing", action="store_true", help="drop recordings without audio (recorded)")
    p.add_argument(
        "--skip-bad", action="store_true", help="drop recordings with unusable audio (recorded with why)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=extract)

    p = commands.add_parser("fit", help="train and evaluate the MLP probe on cached features")
    p.add_argument("--features", required=True, type=Path, help="cache folder written by extract")
    p.add_argument("--layer", required=True, type=_layer, help=f"hidden state 0..12 or {ALL_LAYERS!r}")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--seeds", type=int, default=PROBE.seeds)
    p.add_argument("--lrs", type=float, nargs="+", default=list(PROBE.learning_rates), help="learning rates")
    p.add_argument("--max-epochs", type=int, default=PROBE.max_epochs)
    p.add_argument(
        "--standardize", action="store_true", help="z-score features with training statistics (not MARBLE's)"
    )
    p.add_argument("--batch-size", type=int, default=PROBE.batch_size)
    p.add_argument("--lr-patience", type=int, default=PROBE.lr_patience)
    p.add_argument("--early-stopping-patience", type=int, default=PROBE.early_stopping_patience)
    p.add_argument("--name", help="model name for reports (default: the one recorded by extract)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads (1 is fastest for small probes on a busy CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=fit)

    p = commands.add_parser("report", help="markdown tables and plots over probe runs")
    p.add_argument("runs", nargs="+", type=Path, help="run folders, or folders to search for runs")
    p.add_argument("--out", required=True, type=Path, help="folder for table.md and the PNGs")
    p.add_argument(
        "--base", help="baseline of the differences and the transfer plot (default: the first run's model)"
    )
    p.add_argument(
        "--resamples",
        type=int,
        default=RESAMPLES,
        help="bootstrap resamples of the test recordings, for runs that saved predictions",
    )
    p.set_defaults(run=report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_options(args)
    args.run(args)
    return 0


entry = command(main, "probe")
