"""Sources of pre-training audio: matching a split's training ids to audio files, and scanning them.

Recordings are matched by id: a split that lists ids finds ``<id>.<ext>`` (`AUDIO_EXTENSIONS`)
anywhere below the source's audio folder; a CSV split gives each path. A source without a split
(the replay folder) uses every audio file below its folder, its id being the file name without
extension. Before anything is read further, every training recording of every source is checked
against the valid and test splits of the six evaluation datasets (`splits.EvaluationSplits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from culturemert.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioError, audio_info, find_audio_files
from culturemert.data.config import PreparationError
from culturemert.data.splits import (
    EVALUATION_DATASETS,
    EvaluationSplits,
    Split,
    read_evaluation_splits,
    read_split,
)
from culturemert.errors import listing


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
class SourceFiles:
    """A source with its split (None without one), its training files as (id, path) and the
    training ids skipped because no audio file has them."""

    source: Source
    split: Split | None
    files: list[tuple[str, Path]]
    missing: list[str]


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
        found = find_audio_files(source.audio_dir)
        ids = sorted(found) if split is None else sorted(set(split.train))
        candidates = {recording: found.get(recording, []) for recording in ids}
    ambiguous = [
        f"{recording}: {', '.join(map(str, paths))}"
        for recording, paths in candidates.items()
        if len(paths) > 1
    ]
    if ambiguous:
        raise PreparationError(f"{source.name}: recording ids with several audio files: {listing(ambiguous)}")
    missing = sorted(recording for recording, paths in candidates.items() if not paths)
    if missing and not skip_missing:
        raise PreparationError(
            f"{source.name}: {len(missing)} of {len(candidates)} training ids have no audio file below "
            f"{source.audio_dir} (looked for <id>{{{','.join(AUDIO_EXTENSIONS)}}} at any depth): "
            f"{listing(missing)}; pass --skip-missing to prepare from the files present"
        )
    files = [(recording, paths[0]) for recording, paths in sorted(candidates.items()) if paths]
    if not files:
        raise PreparationError(
            f"{source.name}: no training recording has an audio file below {source.audio_dir}"
        )
    return files, missing


def read_sources(
    sources: list[Source], splits_root: Path, skip_missing: bool, trust_pickle: bool = False
) -> tuple[list[SourceFiles], EvaluationSplits]:
    """Read each source's split, match its training ids to audio files and run the leak guard
    against the evaluation splits under `splits_root` and the sources' own valid/test rows
    (`trust_pickle`: see `splits.load_string_array`)."""
    dataset_folders = {(splits_root / name).resolve() for name in EVALUATION_DATASETS}
    splits = [
        None if source.split_path is None else read_split(source.split_path, trust_pickle)
        for source in sources
    ]
    own_splits = [
        (f"{source.name} ({source.split_path})", split)
        for source, split in zip(sources, splits)
        if split is not None and source.split_path.resolve() not in dataset_folders
    ]
    evaluation = read_evaluation_splits(splits_root, own_splits, trust_pickle)
    matched = [
        SourceFiles(source, split, *training_files(source, split, skip_missing))
        for source, split in zip(sources, splits)
    ]
    evaluation.check_no_leak(item for source in matched for item in source.files)
    return matched, evaluation


def resampled_length(num_samples: int, sample_rate: int) -> int:
    """Length of `num_samples` at `sample_rate` once soxr resamples it to 24 kHz (rounded half up)."""
    return (num_samples * SAMPLE_RATE + sample_rate // 2) // sample_rate


def scan(source: SourceFiles, skip_unreadable: bool = False) -> tuple[list[Recording], list[str]]:
    """The training recordings of a source with their 24 kHz lengths, read from file headers, and
    the files skipped as unreadable (`skip_unreadable`; otherwise the first one is an `AudioError`)."""
    recordings, unreadable = [], []
    for recording_id, path in tqdm(source.files, desc=f"headers {source.source.name}", unit="file"):
        try:
            num_samples, sample_rate, _ = audio_info(path)
        except AudioError as error:
            if not skip_unreadable:
                raise
            unreadable.append(str(error))
            continue
        recordings.append(
            Recording(source.source.name, recording_id, path, resampled_length(num_samples, sample_rate))
        )
    return recordings, unreadable
