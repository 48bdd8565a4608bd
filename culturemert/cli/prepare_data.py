"""Prepare the continual pre-training data of a run: 30 s segments of training-split audio at 24 kHz
mono, and fairseq manifests <out>/<name>/<stage>/{train,valid}.tsv with <out>/<name>/provenance.json.

python scripts/prepare_data.py --run makam --culture makam=/data/makam --replay /data/music4all
python scripts/prepare_data.py --run multi --culture makam=/data/makam --culture hindustani=/data/hin \\
    --culture carnatic=/data/car --culture lyra=/data/lyra --replay /data/music4all
python scripts/prepare_data.py --run makam --culture makam=/data/my_makam \\
    --split makam=/data/my_makam/split.csv --replay /data/music4all --stage1-hours 0.5 --stage2-hours 2

Budgets, replay share and segment policy come from configs/data/<run>.yaml; the flags below override
them. A culture's split defaults to <splits-root>/<culture> (the published splits shipped with the
package); audio files are named by recording id. Exits with status 2 and a one-line message on bad
inputs, and writes nothing when a training file belongs to the valid or test split of any
evaluation dataset (Lyra's fixed validation carve included). A rerun resumes: segments already cut
from the same recording content are kept, those of a changed recording are cut again.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path

from culturemert.audio import AUDIO_EXTENSIONS
from culturemert.cli import command
from culturemert.data.config import REPLAY, STAGES, PreparationError, load_data_config
from culturemert.data.preparation import prepare
from culturemert.data.sources import Source
from culturemert.data.splits import DEFAULT_SPLITS_ROOT
from culturemert.errors import listing

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "data"
REPLAY_STAGES = {"stage1": ("stage1",), "both": STAGES}

logger = logging.getLogger("prepare_data")


def _pairs(values: list[str], flag: str) -> dict[str, Path]:
    """Parse repeated NAME=PATH flags, refusing malformed and repeated names."""
    pairs: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise PreparationError(f"{flag} {value!r}: expected NAME=PATH")
        if name in pairs:
            raise PreparationError(f"{flag}: {name!r} given twice")
        pairs[name] = Path(path)
    return pairs


def _sources(args: argparse.Namespace, cultures: list[str]) -> list[Source]:
    folders = _pairs(args.culture, "--culture")
    splits = _pairs(args.split, "--split")
    unknown = sorted(set(folders) - set(cultures)) + sorted(set(splits) - set(cultures) - {REPLAY})
    if unknown:
        raise PreparationError(
            f"{', '.join(unknown)}: not a culture of this run (it has {', '.join(cultures)})"
        )
    absent = [name for name in cultures if name not in folders]
    if absent:
        raise PreparationError(f"pass the audio folder of {', '.join(absent)} with --culture NAME=DIR")
    sources = []
    for name in cultures:
        split = splits.get(name, args.splits_root / name)
        if not split.exists():
            raise PreparationError(f"{name}: no split at {split}; pass --split {name}=PATH")
        sources.append(Source(name, folders[name], split))
    if args.replay is not None:
        sources.append(Source(REPLAY, args.replay, splits.get(REPLAY)))
    elif REPLAY in splits:
        raise PreparationError(f"--split {REPLAY}=... needs the replay folder, --replay DIR")
    return sources


def _log_skipped_files(sources: list[Source]) -> None:
    """Log, per source, the files below its audio folder that it does not read as audio (an
    extension outside `AUDIO_EXTENSIONS`; hidden files and the source's split file left out)."""
    for source in sources:
        split = source.split_path.resolve() if source.split_path is not None else None
        skipped = sorted(
            str(Path(parent, name).relative_to(source.audio_dir))
            for parent, _, names in os.walk(source.audio_dir)
            for name in names
            if not name.startswith(".")
            and os.path.splitext(name)[1].lower() not in AUDIO_EXTENSIONS
            and Path(parent, name).resolve() != split
        )
        if skipped:
            logger.warning(
                "%s: skipping %d file(s) below %s that are not audio (%s): %s",
                source.name,
                len(skipped),
                source.audio_dir,
                ", ".join(AUDIO_EXTENSIONS),
                listing(skipped, 5),
            )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_data", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--run", required=True, help="a run of configs/data/ (makam, multi, ...) or a YAML path"
    )
    parser.add_argument(
        "--culture", action="append", default=[], metavar="NAME=DIR", help="audio of a culture"
    )
    parser.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="split of a culture (or of 'replay'): a ccml_splits folder or a path,split CSV",
    )
    parser.add_argument(
        "--replay",
        type=Path,
        help="Western replay audio (e.g. Music4All); all training unless --split replay=...",
    )
    parser.add_argument(
        "--splits-root", type=Path, default=DEFAULT_SPLITS_ROOT, help="evaluation splits (default: shipped)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "data_manifests", help="manifest folder")
    parser.add_argument("--name", help="output subfolder of --out (default: the run)")
    parser.add_argument("--audio-out", type=Path, help="segment folder (default: <out>/<name>/audio)")
    parser.add_argument("--seed", type=int, help="segment order seed (default: the config's)")
    parser.add_argument("--stage1-hours", type=float, help="stage-1 training hours (default: the config's)")
    parser.add_argument("--stage2-hours", type=float, help="stage-2 training hours (default: the config's)")
    parser.add_argument("--replay-share", type=float, help="replay share of a replay stage's hours")
    parser.add_argument("--replay-stages", choices=sorted(REPLAY_STAGES), help="stages with replay")
    parser.add_argument("--skip-missing", action="store_true", help="prepare from the training files present")
    parser.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="skip (and count) recordings that cannot be read or decoded, instead of stopping",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load split .npy files that are pickles (loading a pickle can run code: trusted files only)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run = Path(args.run) if args.run.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{args.run}.yaml"
    out_dir = args.out / (args.name or run.stem)
    config = load_data_config(run)
    hours = {"stage1": args.stage1_hours, "stage2": args.stage2_hours}
    overrides = {
        "stage_hours": {
            stage: config.stage_hours[stage] if hours[stage] is None else hours[stage] for stage in STAGES
        },
        "seed": config.seed if args.seed is None else args.seed,
        "replay_share": config.replay_share if args.replay_share is None else args.replay_share,
        "replay_stages": REPLAY_STAGES.get(args.replay_stages, config.replay_stages),
    }
    config = replace(config, **overrides)
    sources = _sources(args, list(config.cultures))
    _log_skipped_files(sources)
    provenance = prepare(
        config,
        sources,
        args.splits_root,
        out_dir,
        args.audio_out,
        args.skip_missing,
        args.skip_unreadable,
        args.trust_pickle,
    )
    for name, source in provenance["sources"].items():
        if source["unreadable_skipped"]:
            logger.warning("%s: skipped %d unreadable recording(s)", name, len(source["unreadable_skipped"]))
    if provenance["recordings_recut"]:
        logger.info("re-cut %d recording(s) whose content changed", len(provenance["recordings_recut"]))
    clipped = provenance["samples_clipped"]
    if clipped:
        logger.warning(
            "clipped %d samples beyond full scale in %d recording(s) (listed in provenance.json)",
            sum(clipped.values()),
            len(clipped),
        )
    for stage, summary in provenance["stages"].items():
        train, valid = summary["train"], summary["valid"]
        print(
            f"{stage}: train {train['hours']:.3f} h in {train['segments']} segments "
            f"(replay {100 * summary['replay_share']:.1f} %), valid {valid['hours']:.3f} h in "
            f"{valid['segments']} segments -> {out_dir / stage}"
        )
    return 0


entry = command(main, "prepare_data")
