"""Pre-training data of one run: 30 s segments of training-split audio, stage manifests, provenance.

Thesis 3.1 and 3.5.3: audio is resampled to 24 kHz mono and cut into 30 s segments from the
training split of each culture only; stage 2 holds each culture's hour budget and stage 1 a
subset of which 20 % is Western replay. The concerns live in their own modules:

- `culturemert.data.config`: the run's data config (budgets, replay share, segment policy);
- `culturemert.data.sources`: matching split ids to audio files, the leak guard, header scans;
- `culturemert.data.budgets`: segments, their seeded order and each stage's mix;
- `culturemert.data.writing`: decoding, cutting and writing segments, resuming by content.

`prepare` runs them in that order and writes the manifests and ``provenance.json``; nothing is
written before the leak guard has passed and the stages are planned. A rerun first removes the
manifests and provenance it will rewrite, so one stopped while writing segments leaves nothing
that looks complete (``provenance.json`` is written last). Provenance marks a source ``short``
in a stage where it got more than half a segment less than its target.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from culturemert.audio import SAMPLE_RATE
from culturemert.data.budgets import Segment, StagePlan, plan_stages, segment_order, total
from culturemert.data.config import REPLAY, STAGES, DataConfig, PreparationError
from culturemert.data.manifest import write_manifest
from culturemert.data.sources import Recording, Source, SourceFiles, read_sources, scan
from culturemert.data.splits import DEFAULT_SPLITS_ROOT
from culturemert.data.writing import SEGMENT_FORMAT, write_segments
from culturemert.files import write_json_atomically

SPLITS = ("train", "valid")  # the manifests of each stage


def _hours(num_samples: int) -> float:
    return num_samples / SAMPLE_RATE / 3600


def _summary(segments: dict[str, list[Segment]]) -> dict:
    everything = [segment for chosen in segments.values() for segment in chosen]
    return {
        "hours": _hours(total(everything)),
        "segments": len(everything),
        "sources": {
            name: {
                "hours": _hours(total(chosen)),
                "segments": len(chosen),
                "recordings": len({segment.recording.id for segment in chosen}),
            }
            for name, chosen in segments.items()
        },
    }


def _source_provenance(
    source: SourceFiles, recordings: list[Recording], unreadable: list[str], order: list[Segment]
) -> dict:
    return {
        "audio_dir": str(source.source.audio_dir.resolve()),
        "split_files": [] if source.split is None else [str(path.resolve()) for path in source.split.files],
        "recordings": len(recordings),
        "hours": _hours(sum(recording.num_samples for recording in recordings)),
        "segments": len(order),
        "missing_skipped": source.missing,
        "unreadable_skipped": unreadable,
    }


def _stage_provenance(config: DataConfig, stage: str, plan: StagePlan) -> dict:
    train = _summary(plan.train)
    for name, target in plan.targets.items():
        train["sources"][name]["requested_hours"] = _hours(target)
        train["sources"][name]["short"] = total(plan.train[name]) < target - config.segment_samples / 2
    replay_hours = train["sources"].get(REPLAY, {}).get("hours", 0.0)
    return {
        "requested_hours": config.stage_hours[stage],
        "replay_share": replay_hours / train["hours"],
        "train": train,
        "valid": _summary(plan.valid),
    }


def _chosen(plans: dict[str, StagePlan]) -> set[Segment]:
    """Every segment some stage trains or validates on."""
    return {
        segment
        for plan in plans.values()
        for per_source in (plan.train, plan.valid)
        for segments in per_source.values()
        for segment in segments
    }


def prepare(
    config: DataConfig,
    sources: list[Source],
    splits_root: Path = DEFAULT_SPLITS_ROOT,
    out_dir: Path = Path("data_manifests"),
    audio_out: Path | None = None,
    skip_missing: bool = False,
    skip_unreadable: bool = False,
    trust_pickle: bool = False,
) -> dict:
    """Write the segments under `audio_out` (default ``<out_dir>/audio``),
    ``<out_dir>/<stage>/{train,valid}.tsv`` (rooted at `audio_out`) and ``<out_dir>/provenance.json``
    of a run, and return the provenance.

    `sources` holds one source per culture of `config` and, when a stage has replay, a `REPLAY`
    source. Splits are read and the leak guard runs before anything is written: a training
    recording that belongs to an evaluation split raises `splits.LeakError`. With
    `skip_unreadable`, recordings that cannot be read or decoded are left out (the stages are
    planned again without them) and listed in the provenance;
    `trust_pickle` lets split files that are pickles load (`splits.load_string_array`).
    """
    audio_out = out_dir / "audio" if audio_out is None else audio_out
    needs_replay = any(config.stage_replay_share(stage) > 0 for stage in STAGES)
    expected = sorted(set(config.cultures) | ({REPLAY} if needs_replay else set()))
    if sorted(source.name for source in sources) != expected:
        hint = "; pass the Western replay folder with --replay" if needs_replay else ""
        raise PreparationError(
            f"the run needs audio for {expected}, got {sorted(source.name for source in sources)}{hint}"
        )
    matched, evaluation = read_sources(sources, splits_root, skip_missing, trust_pickle)
    scanned = {source.source.name: scan(source, skip_unreadable) for source in matched}
    recordings = {name: found for name, (found, _) in scanned.items()}
    unreadable = {name: skipped for name, (_, skipped) in scanned.items()}
    orders = {name: segment_order(found, config, name) for name, found in recordings.items()}
    plans = plan_stages(config, orders)
    # A run stopped while writing segments must leave no output that looks complete.
    (out_dir / "provenance.json").unlink(missing_ok=True)
    for stage in STAGES:
        for split in SPLITS:
            (out_dir / stage / f"{split}.tsv").unlink(missing_ok=True)
    written: set[str] = set()
    recut: list[str] = []
    clipped: dict[str, int] = {}
    while True:  # with skip_unreadable, plan again without each recording that failed to decode
        report = write_segments(_chosen(plans), audio_out, config.segment_samples, skip_unreadable)
        written.update(report.written)
        recut += report.recut
        clipped.update(report.clipped)
        if not report.failed:
            break
        for recording, message in report.failed:
            recordings[recording.source].remove(recording)
            unreadable[recording.source].append(message)
        orders = {name: segment_order(found, config, name) for name, found in recordings.items()}
        plans = plan_stages(config, orders)
    chosen = _chosen(plans)
    for stage, plan in plans.items():
        for split_name, per_source in zip(SPLITS, (plan.train, plan.valid)):
            entries = [
                (segment.name, segment.num_samples)
                for segments in per_source.values()
                for segment in segments
            ]
            write_manifest(out_dir / stage / f"{split_name}.tsv", audio_out, sorted(entries))

    fresh = written & {segment.name for segment in chosen}  # some may be of recordings dropped since
    provenance = {
        "config": {**asdict(config), "replay_stages": list(config.replay_stages)},
        "seed": config.seed,
        "sample_rate": SAMPLE_RATE,
        "segment_format": "/".join(SEGMENT_FORMAT),
        "audio_out": str(audio_out.resolve()),
        "segments_written": len(fresh),
        "segments_kept": len(chosen) - len(fresh),
        "recordings_recut": recut,
        "samples_clipped": clipped,
        "leak_check_split_files": [str(path.resolve()) for path in evaluation.files],
        "evaluation_ids": len(evaluation.labels),
        "sources": {
            source.source.name: _source_provenance(
                source,
                recordings[source.source.name],
                unreadable[source.source.name],
                orders[source.source.name],
            )
            for source in matched
        },
        "stages": {stage: _stage_provenance(config, stage, plan) for stage, plan in plans.items()},
    }
    write_json_atomically(out_dir / "provenance.json", provenance)
    return provenance
