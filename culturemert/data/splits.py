"""Dataset splits: which recordings pre-training may use, and which belong to an evaluation split.

Continual pre-training cuts its segments from the training split of each culture only (thesis
3.1, SPEC §3), and must never see a recording of the valid or test split of any of the six probing
datasets (SPEC §5), whose splits lie in ``../shared/data/ccml_splits``. Recordings are named by id.

Split formats read by `read_split`:

- a folder with ``train.npy``, ``valid.npy``, ``test.npy`` (makam, hindustani, carnatic, fma):
  1-D arrays of recording ids (MusicBrainz UUIDs, FMA track ids);
- a folder with ``training.tsv`` and ``test.tsv`` (lyra): the ``id`` column. Lyra's validation set
  is carved out of ``training.tsv`` by the evaluation, so its only fixed evaluation split is test;
- a folder with ``valid.npy`` and ``test.npy`` only (magnatagatune): rows ``<index>\\t<dir>/<clip>.mp3``,
  whose id is the clip's file name without extension (its training list is not distributed);
- a CSV file of ``path,split`` rows (a ``path,split`` header is optional), split one of train, valid,
  test, path relative to the culture's audio folder (or absolute); the id of a row is its file name
  without extension.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from culturemert.errors import UserError

# The six probing datasets of the evaluation protocol (SPEC §5), as folders of the splits root.
EVALUATION_DATASETS = ("makam", "hindustani", "carnatic", "lyra", "fma", "magnatagatune")
SPLIT_NAMES = ("train", "valid", "test")
CSV_HEADER = ["path", "split"]
MAX_LISTED = 10  # offending items named in an error message before "and N more"


class SplitError(UserError):
    """A split that cannot be read; the message names the file and the problem."""


class LeakError(UserError):
    """Training audio that belongs to an evaluation split; the message lists every offending file."""


@dataclass(frozen=True)
class Split:
    """The recording ids of one dataset per split name, and the files they were read from.

    ``paths`` maps the id of each row of a CSV split to its path relative to the audio folder; it
    is empty for the formats that list ids only.
    """

    ids: dict[str, list[str]]
    files: list[Path]
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def train(self) -> list[str]:
        return self.ids.get("train", [])

    def evaluation_ids(self) -> dict[str, list[str]]:
        """The ids of every split other than train, by split name."""
        return {name: ids for name, ids in self.ids.items() if name != "train"}


def listed(items: list[str]) -> str:
    """Join the first `MAX_LISTED` of `items` for an error message, counting the rest."""
    shown = ", ".join(items[:MAX_LISTED])
    return shown if len(items) <= MAX_LISTED else f"{shown} and {len(items) - MAX_LISTED} more"


def _load_ids(path: Path) -> list[str]:
    try:
        array = np.load(path, allow_pickle=True)
    except (OSError, ValueError) as err:
        raise SplitError(f"{path}: not a readable .npy array of recording ids ({err})") from err
    if array.ndim != 1:
        raise SplitError(f"{path}: expected a 1-D array of recording ids, got shape {array.shape}")
    return [str(item) for item in array.tolist()]


def _recording_id(row: str) -> str:
    """The id of an .npy row: the row itself, or the clip's file name without extension for a
    magnatagatune row ``<index>\\t<dir>/<clip>.mp3``."""
    return Path(row.split("\t")[1]).stem if "\t" in row else row


def _read_npy_folder(folder: Path) -> Split:
    files = [folder / f"{name}.npy" for name in SPLIT_NAMES if (folder / f"{name}.npy").is_file()]
    return Split({path.stem: [_recording_id(row) for row in _load_ids(path)] for path in files}, files)


def _read_tsv_ids(path: Path) -> list[str]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if reader.fieldnames is None or "id" not in reader.fieldnames:
            raise SplitError(f"{path}: expected a tab-separated table with an 'id' column")
        return [row["id"] for row in reader]


def _read_lyra_folder(folder: Path) -> Split:
    files = [folder / "training.tsv", folder / "test.tsv"]
    return Split({"train": _read_tsv_ids(files[0]), "test": _read_tsv_ids(files[1])}, files)


def _read_csv(path: Path) -> Split:
    ids: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    paths: dict[str, str] = {}
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        rows = [(reader.line_num, row) for row in reader if row]
    if rows and [cell.strip().lower() for cell in rows[0][1]] == CSV_HEADER:
        rows = rows[1:]
    for line, row in rows:
        if len(row) != 2 or row[1].strip() not in SPLIT_NAMES:
            raise SplitError(f"{path}:{line}: expected 'path,split' with split in {SPLIT_NAMES}, got {row}")
        relative, split = row[0].strip(), row[1].strip()
        recording = Path(relative).stem
        if recording in paths:
            raise SplitError(
                f"{path}: {paths[recording]!r} and {relative!r} share the recording id {recording!r} "
                "(ids are file names without extension); rename one"
            )
        paths[recording] = relative
        ids[split].append(recording)
    if not paths:
        raise SplitError(f"{path}: lists no recordings")
    return Split(ids, [path], paths)


def read_split(path: str | os.PathLike) -> Split:
    """Read a split in any of the formats of the module docstring, chosen by what `path` holds."""
    path = Path(path)
    if path.is_file():
        return _read_csv(path)
    if (path / "training.tsv").is_file() and (path / "test.tsv").is_file():
        return _read_lyra_folder(path)
    if (path / "valid.npy").is_file() and (path / "test.npy").is_file():
        return _read_npy_folder(path)
    raise SplitError(
        f"{path}: not a split; expected a path,split CSV file or a folder with train/valid/test.npy "
        "(valid/test.npy for magnatagatune) or training.tsv + test.tsv (lyra)"
    )


@dataclass(frozen=True)
class EvaluationSplits:
    """Every recording id of a valid or test split, mapped to the splits that list it (e.g.
    ``makam test``), and the split files read."""

    labels: dict[str, list[str]]
    files: list[Path]

    def check_no_leak(self, items: Iterable[tuple[str, Path]]) -> None:
        """Raise `LeakError` naming every (recording id, audio file) of `items` that is listed."""
        leaks = [
            f"{path} (id {recording}, in {' and '.join(self.labels[recording])})"
            for recording, path in items
            if recording in self.labels
        ]
        if leaks:
            raise LeakError(
                f"refusing to write manifests: {len(leaks)} training file(s) belong to an evaluation "
                f"split: {listed(leaks)}; remove them from the training split"
            )


def read_evaluation_splits(
    splits_root: str | os.PathLike, extra: Iterable[tuple[str, Split]] = ()
) -> EvaluationSplits:
    """Collect the valid and test ids of the six datasets of `EVALUATION_DATASETS` under
    `splits_root` (all must be present) and of the (label, split) pairs of `extra`, such as a
    culture's own CSV split."""
    splits_root = Path(splits_root)
    absent = [name for name in EVALUATION_DATASETS if not (splits_root / name).is_dir()]
    if absent:
        raise SplitError(
            f"{splits_root}: the evaluation splits of {', '.join(absent)} are missing; the leak check "
            f"needs all of {', '.join(EVALUATION_DATASETS)} (pass --splits-root)"
        )
    labels: dict[str, list[str]] = {}
    files: list[Path] = []
    for label, split in [*((name, read_split(splits_root / name)) for name in EVALUATION_DATASETS), *extra]:
        files.extend(split.files)
        for split_name, ids in split.evaluation_ids().items():
            for recording in ids:
                labels.setdefault(recording, []).append(f"{label} {split_name}")
    return EvaluationSplits(labels, files)
