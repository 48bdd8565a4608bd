"""Pre-training data of one run: 30 s segments of training-split audio, stage budgets, manifests.

Thesis 3.1 and 3.5.3, SPEC §3: audio is resampled to 24 kHz mono and cut into 30 s segments from
the training split of each culture only. Stage 2 holds each culture's hour budget (200 h makam,
hindustani and carnatic, 50 h lyra; 650 h for the multi-culture run); stage 1 a subset (60 h,
20 h for lyra, 100 h multi-culture) of which 20 % is Western replay (Music4All). Every number is
a field of the run's data config, ``configs/data/<run>.yaml``.

Policies:

- Recordings are matched by id: a split that lists ids finds ``<id>.<ext>`` (`AUDIO_EXTENSIONS`)
  anywhere below the source's audio folder; a CSV split gives each path. A source without a split
  (the replay folder) uses every audio file below its folder, its id being the file name without
  extension.
- Segments: a recording of L samples at 24 kHz gives floor(L / segment) full segments from its
  start, plus the tail when it lasts at least ``min_segment_seconds`` (5 s: one whole training crop).
- Order: each source's segments are shuffled by (seed, source name). A source contributes the
  prefix of its order whose length is closest to its target (within half a segment), so a smaller
  target's segments are a subset of a larger one's: stage 1 is a subset of stage 2.
- Mix of a stage of T hours with replay share s (stage 1 by default, ``replay_stages``): the
  cultures share (1 - s) T in proportion to their weights (their stage-2 budgets; multi stage 1:
  24.6 h each of makam, hindustani and carnatic, 6.2 h of lyra) and the replay target is
  s / (1 - s) times the culture audio selected, so the share holds when a culture has less audio
  than its target. If the replay folder has too little, the culture targets shrink to keep it.
  A source with less audio than its target uses all of it. Provenance marks a source ``short``
  in a stage where it got more than half a segment less than its target.
- Validation: each stage's ``valid.tsv`` holds, per source of the stage, ``valid_share`` of its
  target (or of all its audio, if less) in segments, at least one, taken from the end of the
  source's order; training selections never reach them, so they are training-split audio that
  no stage trains on.
- Leak guard: before anything is written, every training recording of every source is checked
  against the valid and test splits of the six evaluation datasets (`splits.EvaluationSplits`).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml
from tqdm import tqdm

from culturemert.audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from culturemert.data.manifest import write_manifest
from culturemert.data.splits import (
    EVALUATION_DATASETS,
    EvaluationSplits,
    Split,
    listed,
    read_evaluation_splits,
    read_split,
)
from culturemert.errors import UserError

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aif", ".aiff")
STAGES = ("stage1", "stage2")
REPLAY = "replay"  # the source name of the Western replay folder
SEGMENT_FORMAT = ("FLAC", "PCM_16")  # soundfile format and subtype of the written segments


class PreparationError(UserError):
    """Inputs that cannot make a run's data; the message names the problem and the fix."""


@dataclass(frozen=True)
class DataConfig:
    """The data of one run (configs/data/<run>.yaml).

    ``cultures`` maps each culture to its stage-2 hours, which also weigh the cultures' share of
    stage 1; ``stage_hours`` gives each stage's training hours (updates = hours * 3600 / 160 s);
    ``replay_share`` of the hours of each stage in ``replay_stages`` come from the replay folder.
    """

    cultures: dict[str, float]
    stage_hours: dict[str, float]
    replay_share: float
    replay_stages: tuple[str, ...]
    segment_seconds: float
    min_segment_seconds: float
    valid_share: float
    seed: int

    def __post_init__(self):
        problems = []
        if not self.cultures or min(self.cultures.values()) <= 0 or REPLAY in self.cultures:
            problems.append(f"cultures must map names other than {REPLAY!r} to positive hours")
        if set(self.stage_hours) != set(STAGES) or min(self.stage_hours.values()) <= 0:
            problems.append(f"stage_hours must give positive hours for exactly {list(STAGES)}")
        if not 0 <= self.replay_share < 1:
            problems.append("replay_share must lie in [0, 1)")
        if not set(self.replay_stages) <= set(STAGES):
            problems.append(f"replay_stages must be a subset of {list(STAGES)}")
        if not 0 < self.min_segment_seconds <= self.segment_seconds:
            problems.append("need 0 < min_segment_seconds <= segment_seconds")
        if not 0 < self.valid_share < 1:
            problems.append("valid_share must lie in (0, 1)")
        if problems:
            raise PreparationError(f"invalid data config: {'; '.join(problems)}")

    @property
    def segment_samples(self) -> int:
        return round(self.segment_seconds * SAMPLE_RATE)

    @property
    def min_segment_samples(self) -> int:
        return round(self.min_segment_seconds * SAMPLE_RATE)

    def stage_replay_share(self, stage: str) -> float:
        return self.replay_share if stage in self.replay_stages else 0.0

    def targets(self, stage: str) -> dict[str, int]:
        """Requested samples per source of `stage`: the replay share, if any, and the rest split
        between the cultures in proportion to their weights."""
        samples = self.stage_hours[stage] * 3600 * SAMPLE_RATE
        share = self.stage_replay_share(stage)
        weight = sum(self.cultures.values())
        targets = {
            name: round((1 - share) * samples * hours / weight) for name, hours in self.cultures.items()
        }
        if share > 0:
            targets[REPLAY] = round(share * samples)
        return targets


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Read a data config YAML; unknown or missing keys are refused by name."""
    path = Path(path)
    if not path.is_file():
        raise PreparationError(f"{path}: no such data config; see configs/data/ for the runs")
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise PreparationError(f"{path}: expected a mapping of data config keys")
    names = {field.name for field in fields(DataConfig)}
    if set(values) != names:
        raise PreparationError(
            f"{path}: unknown keys {sorted(set(values) - names)}, missing keys {sorted(names - set(values))}"
        )
    values["replay_stages"] = tuple(values["replay_stages"])
    return DataConfig(**values)


@dataclass(frozen=True)
class Source:
    """One source of audio: its name (a culture of the config, or `REPLAY`), its audio folder and
    its split (None: every audio file below the folder is a training recording)."""

    name: str
    audio_dir: Path
    split_path: Path | None


@dataclass(frozen=True)
class Recording:
    """A training recording of a source and its length once resampled to 24 kHz."""

    source: str
    id: str
    path: Path
    num_samples: int  # at 24 kHz


@dataclass(frozen=True)
class Segment:
    """Samples [start, start + num_samples) of a recording at 24 kHz, written to `name`."""

    recording: Recording
    index: int
    start: int
    num_samples: int

    @property
    def name(self) -> str:
        return f"{self.recording.source}/{self.recording.id}_{self.index:04d}.flac"


def find_audio(folder: Path) -> dict[str, list[Path]]:
    """Audio files below `folder` (any depth, `AUDIO_EXTENSIONS`) by recording id: the file name
    without its extension."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
            found.setdefault(path.stem, []).append(path)
    return found


def training_files(
    source: Source, split: Split | None, skip_missing: bool
) -> tuple[list[tuple[str, Path]], list[str]]:
    """(id, audio path) of every training recording of `source`, and the training ids that have no
    audio file. Missing ids are an error unless `skip_missing`; an id with two files always is."""
    if not source.audio_dir.is_dir():
        raise PreparationError(f"{source.name}: no such audio folder {source.audio_dir}")
    if split is not None and split.paths:
        candidates = {}
        for recording in split.train:
            path = source.audio_dir / split.paths[recording]
            candidates[recording] = [path] if path.is_file() else []
    else:
        found = find_audio(source.audio_dir)
        ids = sorted(found) if split is None else sorted(set(split.train))
        candidates = {recording: found.get(recording, []) for recording in ids}
    ambiguous = [
        f"{recording}: {', '.join(map(str, paths))}"
        for recording, paths in candidates.items()
        if len(paths) > 1
    ]
    if ambiguous:
        raise PreparationError(f"{source.name}: recording ids with several audio files: {listed(ambiguous)}")
    missing = sorted(recording for recording, paths in candidates.items() if not paths)
    if missing and not skip_missing:
        raise PreparationError(
            f"{source.name}: {len(missing)} of {len(candidates)} training ids have no audio file below "
            f"{source.audio_dir} (looked for <id>{{{','.join(AUDIO_EXTENSIONS)}}} at any depth): "
            f"{listed(missing)}; pass --skip-missing to prepare from the files present"
        )
    files = [(recording, paths[0]) for recording, paths in sorted(candidates.items()) if paths]
    if not files:
        raise PreparationError(
            f"{source.name}: no training recording has an audio file below {source.audio_dir}"
        )
    return files, missing


def resampled_length(num_samples: int, sample_rate: int) -> int:
    """Length of `num_samples` at `sample_rate` once soxr resamples it to 24 kHz (rounded half up)."""
    return (num_samples * SAMPLE_RATE + sample_rate // 2) // sample_rate


def cut(recording: Recording, segment_samples: int, min_samples: int) -> list[Segment]:
    """The full segments of `recording` from its start, and its tail if at least `min_samples`."""
    starts = range(0, recording.num_samples, segment_samples)
    segments = [
        Segment(recording, index, start, min(segment_samples, recording.num_samples - start))
        for index, start in enumerate(starts)
    ]
    return [segment for segment in segments if segment.num_samples >= min_samples]


def segment_order(recordings: list[Recording], config: DataConfig, source: str) -> list[Segment]:
    """Every segment of `recordings`, in an order drawn from (seed, `source`) that does not depend
    on the order the recordings were found in."""
    segments = [
        segment
        for recording in sorted(recordings, key=lambda recording: recording.id)
        for segment in cut(recording, config.segment_samples, config.min_segment_samples)
    ]
    random.Random(f"{source}/{config.seed}").shuffle(segments)
    return segments


def total(segments: Iterable[Segment]) -> int:
    return sum(segment.num_samples for segment in segments)


def closest_prefix(order: list[Segment], target: int) -> list[Segment]:
    """The prefix of `order` whose total length is closest to `target` samples (the shorter on a
    tie); all of `order` when it is shorter than the target."""
    ends = np.cumsum([0] + [segment.num_samples for segment in order])
    return order[: int(np.argmin(np.abs(ends - target)))]


def select_mix(
    targets: dict[str, int], pools: dict[str, list[Segment]], share: float
) -> dict[str, list[Segment]]:
    """Training segments of one stage, per source (see the module docstring for the mix rule)."""
    cultures = {
        name: closest_prefix(pools[name], target) for name, target in targets.items() if name != REPLAY
    }
    if REPLAY not in targets:
        return cultures
    ratio = share / (1 - share)
    wanted = ratio * total(segment for chosen in cultures.values() for segment in chosen)
    available = total(pools[REPLAY])
    if available < wanted:
        scale = available / wanted
        cultures = {
            name: closest_prefix(pools[name], round(total(chosen) * scale))
            for name, chosen in cultures.items()
        }
        wanted = ratio * total(segment for chosen in cultures.values() for segment in chosen)
    return {**cultures, REPLAY: closest_prefix(pools[REPLAY], round(wanted))}


@dataclass(frozen=True)
class StagePlan:
    """One stage's requested samples, training and validation segments, per source."""

    targets: dict[str, int]
    train: dict[str, list[Segment]]
    valid: dict[str, list[Segment]]


def plan_stages(config: DataConfig, orders: dict[str, list[Segment]]) -> dict[str, StagePlan]:
    """Training and validation segments of every stage, per source, from each source's order."""
    targets = {stage: config.targets(stage) for stage in STAGES}

    def valid_count(name: str, target: int) -> int:
        return max(1, round(config.valid_share * min(target, total(orders[name])) / config.segment_samples))

    held_out = {
        name: max(valid_count(name, targets[stage][name]) for stage in STAGES if name in targets[stage])
        for name in orders
    }
    too_short = [
        f"{name} ({len(order)} segments)" for name, order in orders.items() if len(order) <= held_out[name]
    ]
    if too_short:
        raise PreparationError(
            f"too little audio to hold out validation segments and still train: {', '.join(too_short)}"
        )
    pools = {name: order[: len(order) - held_out[name]] for name, order in orders.items()}
    plans = {}
    for stage in STAGES:
        train = select_mix(targets[stage], pools, config.stage_replay_share(stage))
        if not any(train.values()):
            raise PreparationError(
                f"{stage}: {config.stage_hours[stage]} h selects no {config.segment_seconds} s segment; "
                f"raise --{stage}-hours"
            )
        valid = {
            name: orders[name][::-1][: valid_count(name, target)] for name, target in targets[stage].items()
        }
        plans[stage] = StagePlan(targets[stage], train, valid)
    return plans


def _is_complete(path: Path, num_samples: int) -> bool:
    """Whether `path` already holds a segment of `num_samples` (written atomically, so a file
    that is there was finished)."""
    if not path.is_file():
        return False
    try:
        info = sf.info(str(path))
    except sf.SoundFileError:
        return False
    return (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 1, num_samples)


def _write_atomic(path: Path, audio: np.ndarray) -> None:
    """Write 16-bit mono FLAC at `path` through a temporary file; samples are clipped to full scale
    (resampling can overshoot it slightly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        sf.write(
            partial,
            np.clip(audio, -1.0, 1.0),
            SAMPLE_RATE,
            format=SEGMENT_FORMAT[0],
            subtype=SEGMENT_FORMAT[1],
        )
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_segments(segments: Iterable[Segment], audio_out: Path) -> tuple[int, int]:
    """Write every segment under `audio_out`, decoding each recording once; segments already
    written completely are kept, so an interrupted run resumes. Returns (written, kept)."""
    by_recording: dict[Recording, list[Segment]] = {}
    for segment in segments:
        by_recording.setdefault(segment.recording, []).append(segment)
    written = kept = 0
    for recording in tqdm(
        sorted(by_recording, key=lambda r: (r.source, r.id)), desc="segments", unit="recording"
    ):
        todo = [
            seg for seg in by_recording[recording] if not _is_complete(audio_out / seg.name, seg.num_samples)
        ]
        kept += len(by_recording[recording]) - len(todo)
        if not todo:
            continue
        audio = load_audio(recording.path)
        for segment in todo:
            end = segment.start + segment.num_samples
            if end > len(audio):
                raise AudioError(
                    f"{recording.path}: its header promises {recording.num_samples} samples at 24 kHz but "
                    f"{len(audio)} decode; re-encode the file (e.g. to FLAC) and run again"
                )
            _write_atomic(audio_out / segment.name, audio[segment.start : end])
            written += 1
    return written, kept


def _hours(num_samples: int) -> float:
    return num_samples / SAMPLE_RATE / 3600


@dataclass(frozen=True)
class SourceFiles:
    """A source with its split (None without one), its training files as (id, path) and the
    training ids skipped because no audio file has them."""

    source: Source
    split: Split | None
    files: list[tuple[str, Path]]
    missing: list[str]


def read_sources(
    sources: list[Source], splits_root: Path, skip_missing: bool
) -> tuple[list[SourceFiles], EvaluationSplits]:
    """Read each source's split, match its training ids to audio files and run the leak guard
    against the evaluation splits under `splits_root` and the sources' own valid/test rows."""
    dataset_folders = {(splits_root / name).resolve() for name in EVALUATION_DATASETS}
    splits = [None if source.split_path is None else read_split(source.split_path) for source in sources]
    own_splits = [
        (f"{source.name} ({source.split_path})", split)
        for source, split in zip(sources, splits)
        if split is not None and source.split_path.resolve() not in dataset_folders
    ]
    evaluation = read_evaluation_splits(splits_root, own_splits)
    matched = [
        SourceFiles(source, split, *training_files(source, split, skip_missing))
        for source, split in zip(sources, splits)
    ]
    evaluation.check_no_leak(item for source in matched for item in source.files)
    return matched, evaluation


def scan(source: SourceFiles) -> list[Recording]:
    """The training recordings of a source with their 24 kHz lengths, read from file headers."""
    recordings = []
    for recording_id, path in tqdm(source.files, desc=f"headers {source.source.name}", unit="file"):
        num_samples, sample_rate, _ = audio_info(path)
        length = resampled_length(num_samples, sample_rate)
        recordings.append(Recording(source.source.name, recording_id, path, length))
    return recordings


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


def _source_provenance(source: SourceFiles, recordings: list[Recording], order: list[Segment]) -> dict:
    return {
        "audio_dir": str(source.source.audio_dir.resolve()),
        "split_files": [] if source.split is None else [str(path.resolve()) for path in source.split.files],
        "recordings": len(recordings),
        "hours": _hours(sum(recording.num_samples for recording in recordings)),
        "segments": len(order),
        "missing_skipped": source.missing,
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


def _write_json(path: Path, value: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def prepare(
    config: DataConfig,
    sources: list[Source],
    splits_root: Path,
    out_dir: Path,
    audio_out: Path,
    skip_missing: bool = False,
) -> dict:
    """Write the segments under `audio_out`, ``<out_dir>/<stage>/{train,valid}.tsv`` (rooted at
    `audio_out`) and ``<out_dir>/provenance.json`` of a run, and return the provenance.

    `sources` holds one source per culture of `config` and, when a stage has replay, a `REPLAY`
    source. Splits are read and the leak guard runs before anything is written: a training
    recording that belongs to an evaluation split raises `splits.LeakError`.
    """
    needs_replay = any(config.stage_replay_share(stage) > 0 for stage in STAGES)
    expected = sorted(set(config.cultures) | ({REPLAY} if needs_replay else set()))
    if sorted(source.name for source in sources) != expected:
        hint = "; pass the Western replay folder with --replay" if needs_replay else ""
        raise PreparationError(
            f"the run needs audio for {expected}, got {sorted(source.name for source in sources)}{hint}"
        )
    matched, evaluation = read_sources(sources, splits_root, skip_missing)
    recordings = {source.source.name: scan(source) for source in matched}
    orders = {name: segment_order(found, config, name) for name, found in recordings.items()}
    plans = plan_stages(config, orders)

    chosen = {
        segment
        for plan in plans.values()
        for per_source in (plan.train, plan.valid)
        for segments in per_source.values()
        for segment in segments
    }
    written, kept = write_segments(chosen, audio_out)
    for stage, plan in plans.items():
        for split_name, per_source in (("train", plan.train), ("valid", plan.valid)):
            entries = [
                (segment.name, segment.num_samples)
                for segments in per_source.values()
                for segment in segments
            ]
            write_manifest(out_dir / stage / f"{split_name}.tsv", audio_out, sorted(entries))

    provenance = {
        "config": {**asdict(config), "replay_stages": list(config.replay_stages)},
        "seed": config.seed,
        "sample_rate": SAMPLE_RATE,
        "segment_format": "/".join(SEGMENT_FORMAT),
        "audio_out": str(audio_out.resolve()),
        "segments_written": written,
        "segments_kept": kept,
        "leak_check_split_files": [str(path.resolve()) for path in evaluation.files],
        "evaluation_ids": len(evaluation.labels),
        "sources": {
            source.source.name: _source_provenance(
                source, recordings[source.source.name], orders[source.source.name]
            )
            for source in matched
        },
        "stages": {stage: _stage_provenance(config, stage, plan) for stage, plan in plans.items()},
    }
    _write_json(out_dir / "provenance.json", provenance)
    return provenance
