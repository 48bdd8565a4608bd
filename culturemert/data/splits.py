"""Dataset splits: which recordings pre-training may use, and which belong to an evaluation split.

Continual pre-training cuts its segments from the training split of each culture only (thesis
3.1), and must never see a recording of the valid or test split of any of the six probing
datasets (thesis 3.5.2), whose published splits ship with the package (`DEFAULT_SPLITS_ROOT`,
see its README). Recordings are named by id. Every file is read without pickle.

Split formats read by `read_split`:

- a folder with ``train.npy``, ``valid.npy``, ``test.npy`` (makam, hindustani, carnatic, fma):
  1-D string arrays of recording ids (MusicBrainz UUIDs, FMA track ids);
- a folder with ``training.tsv`` and ``test.tsv`` (lyra): the ``id`` column. Lyra has no published
  validation split: the ids of ``valid.txt`` (one a line; the shipped carve `LYRA_CARVE` when the
  folder has none) are its validation split, and the rest of training.tsv its training split;
- a folder with ``valid.npy`` and ``test.npy`` only (magnatagatune): rows ``<index>\\t<dir>/<clip>.mp3``,
  whose id is the clip's file name without extension (its training list is not distributed);
- a CSV file of ``path,split`` rows (a ``path,split`` header is optional), split one of train, valid,
  test, path relative to the culture's audio folder (or absolute); the id of a row is its file name
  without extension.

The leak guard compares ids by `recording_key`: case-insensitively and without an audio file
extension, so a training file ``ABC.FLAC`` matches the evaluation id ``abc``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from culturemert.audio import AUDIO_EXTENSIONS
from culturemert.errors import UserError, listing

# The published splits of the six probing datasets (thesis 3.5.2), shipped with the package.
DEFAULT_SPLITS_ROOT = Path(__file__).resolve().parent / "ccml_splits"
# The six probing datasets of the evaluation protocol, as folders of a splits root.
EVALUATION_DATASETS = ("makam", "hindustani", "carnatic", "lyra", "fma", "magnatagatune")
SPLIT_NAMES = ("train", "valid", "test")
CSV_HEADER = ["path", "split"]
LYRA_VALID = "valid.txt"  # Lyra's fixed validation carve of training.tsv, one id a line
LYRA_CARVE = DEFAULT_SPLITS_ROOT / "lyra" / LYRA_VALID
TABLE_ENCODING = "utf-8-sig"  # CSV/TSV tables: UTF-8, a leading byte-order mark (Excel) dropped


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


def recording_key(name: str) -> str:
    """How the leak guard compares recording ids: lower case, without an audio file extension."""
    stem, extension = os.path.splitext(name.strip().lower())
    return stem if extension in AUDIO_EXTENSIONS else name.strip().lower()


def load_string_array(path: Path, trust_pickle: bool = False) -> list[str]:
    """A 1-D ``.npy`` array of strings (or integers), read without pickle; an object array (a
    pickle, which can run code when loaded) only with `trust_pickle`."""
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if not trust_pickle:
            raise SplitError(
                f"{path}: holds pickled objects, and loading a pickle can run code; save the ids as a "
                "plain string array (numpy.save(path, numpy.array(ids, dtype=str))) or a path,split CSV, "
                "or pass --trust-pickle if you trust the file"
            ) from err
        array = np.load(path, allow_pickle=True)
    except OSError as err:
        raise SplitError(f"{path}: not a readable .npy array of recording ids ({err})") from err
    if array.ndim != 1 or array.dtype.kind not in "USiuO":
        raise SplitError(f"{path}: expected a 1-D array of recording ids, got {array.dtype} {array.shape}")
    return [str(item) for item in array.tolist()]


def _recording_id(row: str) -> str:
    """The id of an .npy row: the row itself, or the clip's file name without extension for a
    magnatagatune row ``<index>\\t<dir>/<clip>.mp3``."""
    return Path(row.split("\t")[1]).stem if "\t" in row else row


def _read_npy_folder(folder: Path, trust_pickle: bool) -> Split:
    files = [folder / f"{name}.npy" for name in SPLIT_NAMES if (folder / f"{name}.npy").is_file()]
    ids = {path.stem: [_recording_id(row) for row in load_string_array(path, trust_pickle)] for path in files}
    return Split(ids, files)


def _read_tsv_ids(path: Path) -> list[str]:
    with path.open(newline="", encoding=TABLE_ENCODING) as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if reader.fieldnames is None or "id" not in reader.fieldnames:
            raise SplitError(f"{path}: expected a tab-separated table with an 'id' column")
        return [row["id"] for row in reader]


def _read_lyra_folder(folder: Path) -> Split:
    carve = folder / LYRA_VALID if (folder / LYRA_VALID).is_file() else LYRA_CARVE
    files = [folder / "training.tsv", carve, folder / "test.tsv"]
    held_out = {line.strip() for line in carve.read_text().splitlines() if line.strip()}
    training = _read_tsv_ids(files[0])
    ids = {
        "train": [recording for recording in training if recording not in held_out],
        "valid": [recording for recording in training if recording in held_out],
        "test": _read_tsv_ids(files[2]),
    }
    return Split(ids, files)


def table_rows(path: Path, header: list[str], delimiter: str = ",") -> list[tuple[int, list[str]]]:
    """The non-empty rows of a CSV (or, with `delimiter`, TSV) file with their line numbers,
    leaving out a first row equal to `header` (compared case-insensitively). UTF-8, with or
    without the byte-order mark Excel writes (`TABLE_ENCODING`)."""
    with path.open(newline="", encoding=TABLE_ENCODING) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        rows = [(reader.line_num, row) for row in reader if row]
    if rows and [cell.strip().lower() for cell in rows[0][1]] == header:
        rows = rows[1:]
    return rows


def _read_csv(path: Path) -> Split:
    ids: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    paths: dict[str, str] = {}
    for line, row in table_rows(path, CSV_HEADER):
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


def read_split(path: str | os.PathLike, trust_pickle: bool = False) -> Split:
    """Read a split in any of the formats of the module docstring, chosen by what `path` holds
    (`trust_pickle`: see `load_string_array`)."""
    path = Path(path)
    if path.is_file():
        return _read_csv(path)
    if (path / "training.tsv").is_file() and (path / "test.tsv").is_file():
        return _read_lyra_folder(path)
    if (path / "valid.npy").is_file() and (path / "test.npy").is_file():
        return _read_npy_folder(path, trust_pickle)
    raise SplitError(
        f"{path}: not a split; expected a path,split CSV file or a folder with train/valid/test.npy "
        "(valid/test.npy for magnatagatune) or training.tsv + test.tsv (lyra)"
    )


@dataclass(frozen=True)
class EvaluationSplits:
    """Every recording of a valid or test split by `recording_key`, mapped to the splits that list
    it (e.g. ``makam test``), and the split files read."""

    labels: dict[str, list[str]]
    files: list[Path]

    def check_no_leak(self, items: Iterable[tuple[str, Path]]) -> None:
        """Raise `LeakError` naming every (recording id, audio file) of `items` whose id or file
        name is listed (compared by `recording_key`)."""
        leaks = []
        for recording, path in items:
            keys = [key for key in (recording_key(recording), recording_key(path.name)) if key in self.labels]
            if keys:
                leaks.append(f"{path} (id {recording}, in {' and '.join(self.labels[keys[0]])})")
        if leaks:
            raise LeakError(
                f"refusing to write manifests: {len(leaks)} training file(s) belong to an evaluation "
                f"split: {listing(leaks)}; remove them from the training split"
            )


def read_evaluation_splits(
    splits_root: str | os.PathLike = DEFAULT_SPLITS_ROOT,
    extra: Iterable[tuple[str, Split]] = (),
    trust_pickle: bool = False,
) -> EvaluationSplits:
    """Collect the valid and test ids of the six datasets of `EVALUATION_DATASETS` under
    `splits_root` (all must be present; Lyra's valid ids are its carve) and of the (label, split)
    pairs of `extra`, such as a culture's own CSV split."""
    splits_root = Path(splits_root)
    absent = [name for name in EVALUATION_DATASETS if not (splits_root / name).is_dir()]
    if absent:
        raise SplitError(
            f"{splits_root}: the evaluation splits of {', '.join(absent)} are missing; the leak check "
            f"needs all of {', '.join(EVALUATION_DATASETS)} (pass --splits-root)"
        )
    labels: dict[str, list[str]] = {}
    files: list[Path] = []
    evaluation = [(name, read_split(splits_root / name, trust_pickle)) for name in EVALUATION_DATASETS]
    for label, split in [*evaluation, *extra]:
        files.extend(split.files)
        for split_name, ids in split.evaluation_ids().items():
            for recording in ids:
                labels.setdefault(recording_key(recording), []).append(f"{label} {split_name}")
    return EvaluationSplits(labels, files)
