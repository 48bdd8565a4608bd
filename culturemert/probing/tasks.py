"""Probing tasks: tagged recordings on a train/valid/test split (SPEC §5; thesis 3.5.2).

A `Task` lists each recording's id, split and multi-hot labels over a tag vocabulary. The six
datasets of the evaluation are read from the published splits (``../shared/data/ccml_splits``):

| task | split files | tags (top k, `TOP_K`) |
| --- | --- | --- |
| makam | train/valid/test.npy + the user's Dunya metadata.npy | 30: makam, usul, instruments |
| hindustani, carnatic | the same | 20 each: raga, tala, instruments, forms |
| lyra | training.tsv, test.tsv | 30: ``instrument:Voice``, ``genre:Laiko``, ``place:Epirus`` |
| fma | train/valid/test.npy, metadata.npy (id -> genres) | 20 hierarchical genres |
| magnatagatune | tags.npy, valid.npy, test.npy + train.npy, binary.npy | the 50 of tags.npy |

Dunya's metadata.npy is not redistributable and comes from the user, in the layout of fma's
(a pickled dict: recording id -> list of tag names). MagnaTagATune's train.npy and binary.npy are
the public minzwon/sota-music-tagging-models files, too large to ship with the splits: the user
passes the folder holding them.

Any other tagged collection is a CSV task file of ``path,split,tags`` rows (header optional):
path relative to the audio root (or absolute), split one of train/valid/test, tags separated by
``|``; the recording id is the file name without extension; the vocabulary is every tag with a
training positive (or the top k of them).

Decisions:

- Top-k tags are counted over the training split only (ties broken by name), so the test split
  chooses nothing. A recording none of whose tags made the vocabulary keeps an all-zero row.
- Lyra's validation set is `LYRA_VALID_FRACTION` of training.tsv: the first ids of a permutation
  of the sorted ids drawn with seed `LYRA_VALID_SEED`, the same on every machine and run.
- Audio of a recording is ``<audio root>/<path>`` where its split names a path (magnatagatune,
  CSV tasks) and that file exists; otherwise the single audio file anywhere under the audio root
  whose name without extension is the id (``fma_medium/000/000002.mp3`` for fma id ``000002``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from culturemert.data.splits import SPLIT_NAMES, SplitError, listed, read_split
from culturemert.errors import UserError

# In the order of the thesis tables: non-Western, then Western.
TOP_K = {"makam": 30, "hindustani": 20, "carnatic": 20, "lyra": 30, "fma": 20, "magnatagatune": 50}
MAX_SECONDS = {"makam": 150.0, "hindustani": 780.0, "carnatic": 330.0}  # per-dataset cut (SPEC §5)
BUILTIN_TASKS = tuple(TOP_K)
COMPMUSIC_TASKS = ("makam", "hindustani", "carnatic")
LYRA_COLUMNS = {"instruments": "instrument", "genres": "genre", "place": "place"}
LYRA_ABSENT = "None"  # how Lyra's table marks an empty field
LYRA_VALID_FRACTION = 0.1
LYRA_VALID_SEED = 0
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
TAG_SEPARATOR = "|"
CSV_HEADER = ["path", "split", "tags"]

PathLike = str | os.PathLike


class TaskError(UserError):
    """A task that cannot be built or whose audio cannot be found; the message says which and why."""


@dataclass(frozen=True)
class Task:
    """Recordings of a tagging task, row-aligned: ``ids[i]`` is in split ``splits[i]`` with labels
    ``labels[i]`` (uint8 [recordings, tags]); ``paths[i]`` is its audio path relative to the audio
    root, or None where the split names ids only. Audio longer than ``max_seconds`` is cut."""

    name: str
    ids: list[str]
    splits: list[str]
    tags: list[str]
    labels: np.ndarray
    paths: list[str | None]
    max_seconds: float | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, split: str) -> np.ndarray:
        """Indices of the recordings of `split`."""
        return np.flatnonzero(np.asarray(self.splits) == split)

    def checksum(self) -> str:
        """sha256 of the ids, splits, paths, tags and labels: ties a feature cache to this task."""
        digest = hashlib.sha256(json.dumps([self.ids, self.splits, self.paths, self.tags]).encode())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.uint8).tobytes())
        return digest.hexdigest()

    def select(self, rows: Sequence[int]) -> Task:
        """The task restricted to `rows`, in that order."""
        rows = list(rows)
        return Task(
            self.name,
            [self.ids[i] for i in rows],
            [self.splits[i] for i in rows],
            self.tags,
            self.labels[rows],
            [self.paths[i] for i in rows],
            self.max_seconds,
        )


def top_tags(tag_lists: Iterable[Iterable[str]], k: int | None) -> list[str]:
    """The `k` (all if None) most frequent tags of `tag_lists`, each list counted once per tag;
    ties broken by name."""
    counts = Counter(tag for tags in tag_lists for tag in set(tags))
    ranked = sorted(counts, key=lambda tag: (-counts[tag], tag))
    return ranked if k is None else ranked[:k]


def _build(
    name: str,
    rows: list[tuple[str, str, list[str], str | None]],
    k: int | None,
    max_seconds: float | None,
    vocabulary: list[str] | None = None,
) -> Task:
    """A Task from (id, split, tags, path) rows; the vocabulary is the top `k` training tags
    unless given."""
    ids = [row[0] for row in rows]
    repeated = sorted(recording for recording, count in Counter(ids).items() if count > 1)
    if repeated:
        raise TaskError(f"{name}: recording ids listed more than once: {listed(repeated)}")
    if vocabulary is None:
        vocabulary = top_tags((tags for _, split, tags, _ in rows if split == "train"), k)
    if not vocabulary:
        raise TaskError(f"{name}: no tag has a positive in the training split")
    column = {tag: index for index, tag in enumerate(vocabulary)}
    labels = np.zeros((len(rows), len(vocabulary)), dtype=np.uint8)
    for row, (_, _, tags, _) in enumerate(rows):
        labels[row, [column[tag] for tag in tags if tag in column]] = 1
    splits = [row[1] for row in rows]
    return Task(name, ids, splits, list(vocabulary), labels, [row[3] for row in rows], max_seconds)


def _load_metadata(path: Path, name: str) -> dict[str, list[str]]:
    """A ``metadata.npy`` pickled dict: recording id -> list of tag names."""
    if not path.is_file():
        raise TaskError(f"{name}: no tag metadata at {path}; pass --metadata with the metadata.npy file")
    try:
        metadata = np.load(path, allow_pickle=True).item()
    except (OSError, ValueError) as error:
        raise TaskError(f"{path}: not a pickled dict of id -> tags ({error})") from error
    if not isinstance(metadata, dict):
        raise TaskError(f"{path}: expected a dict of recording id -> list of tags, got {type(metadata)}")
    return {str(key): [str(tag) for tag in tags] for key, tags in metadata.items()}


def load_metadata_task(name: str, splits_dir: PathLike, metadata_path: PathLike | None = None) -> Task:
    """fma, makam, hindustani or carnatic: train/valid/test.npy ids tagged by a metadata.npy dict
    (fma's ships in `splits_dir`; CompMusic's comes from the user), top-k of `TOP_K`."""
    splits_dir = Path(splits_dir)
    if metadata_path is None:
        if name in COMPMUSIC_TASKS:
            raise TaskError(
                f"{name}: the Dunya tag metadata is not redistributable; pass --metadata with a "
                "metadata.npy dict of recording id -> tags (the layout of fma/metadata.npy)"
            )
        metadata_path = splits_dir / "metadata.npy"
    metadata = _load_metadata(Path(metadata_path), name)
    split = read_split(splits_dir)
    rows, untagged = [], []
    for split_name in SPLIT_NAMES:
        for recording in split.ids.get(split_name, []):
            if recording not in metadata:
                untagged.append(recording)
            rows.append((recording, split_name, metadata.get(recording, []), None))
    if untagged:
        raise TaskError(f"{name}: {metadata_path} has no tags for {len(untagged)} ids: {listed(untagged)}")
    return _build(name, rows, TOP_K[name], MAX_SECONDS.get(name))


def _mtat_rows(path: Path) -> list[tuple[int, str]]:
    """(row of binary.npy, relative clip path) of a minzwon split file of ``index<TAB>path`` rows."""
    try:
        items = np.load(path, allow_pickle=True).tolist()
        rows = [(int(index), clip) for index, clip in (str(item).split("\t") for item in items)]
    except (OSError, ValueError) as error:
        raise TaskError(
            f"{path}: expected a .npy array of 'index<TAB>dir/clip.mp3' rows ({error})"
        ) from error
    return rows


def load_magnatagatune(splits_dir: PathLike, metadata_dir: PathLike | None) -> Task:
    """MagnaTagATune on the minzwon split: valid/test lists and the 50 tags from `splits_dir`, the
    training list train.npy and the label matrix binary.npy from `metadata_dir`."""
    splits_dir = Path(splits_dir)
    if metadata_dir is None:
        raise TaskError(
            "magnatagatune: pass --metadata with the folder holding train.npy and binary.npy of the "
            "minzwon/sota-music-tagging-models split (they are too large to ship with the splits)"
        )
    metadata_dir = Path(metadata_dir)
    tags = [str(tag) for tag in np.load(splits_dir / "tags.npy", allow_pickle=True).tolist()]
    binary_path = metadata_dir / "binary.npy"
    if not binary_path.is_file() or not (metadata_dir / "train.npy").is_file():
        raise TaskError(f"magnatagatune: {metadata_dir} must hold train.npy and binary.npy")
    binary = np.load(binary_path)
    if binary.ndim != 2 or binary.shape[1] != len(tags):
        raise TaskError(f"{binary_path}: expected [clips, {len(tags)}] labels, got shape {binary.shape}")
    rows = []
    for split_name, folder in (("train", metadata_dir), ("valid", splits_dir), ("test", splits_dir)):
        for index, clip in _mtat_rows(folder / f"{split_name}.npy"):
            if not 0 <= index < len(binary):
                raise TaskError(f"{folder / split_name}.npy: row index {index} outside {binary_path}")
            positives = [tags[j] for j in np.flatnonzero(binary[index])]
            rows.append((Path(clip).stem, split_name, positives, clip))
    return _build("magnatagatune", rows, None, None, vocabulary=tags)


def _lyra_tags(row: dict[str, str]) -> list[str]:
    return [
        f"{prefix}:{value}"
        for column, prefix in LYRA_COLUMNS.items()
        for value in row[column].split(TAG_SEPARATOR)
        if value and value != LYRA_ABSENT
    ]


def _read_lyra_table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = sorted({"id", *LYRA_COLUMNS} - set(reader.fieldnames or []))
        if missing:
            raise TaskError(f"{path}: missing columns {', '.join(missing)}")
        return list(reader)


def lyra_valid_ids(train_ids: Sequence[str]) -> set[str]:
    """The ids of training.tsv held out for validation (see the module docstring)."""
    ordered = sorted(train_ids)
    permutation = np.random.default_rng(LYRA_VALID_SEED).permutation(len(ordered))
    return {ordered[i] for i in permutation[: round(LYRA_VALID_FRACTION * len(ordered))]}


def load_lyra(splits_dir: PathLike) -> Task:
    """Lyra: training.tsv (train, and the carved validation set) and test.tsv, top 30 tags."""
    splits_dir = Path(splits_dir)
    training = _read_lyra_table(splits_dir / "training.tsv")
    test = _read_lyra_table(splits_dir / "test.tsv")
    valid = lyra_valid_ids([row["id"] for row in training])
    rows = [
        (row["id"], "valid" if row["id"] in valid else "train", _lyra_tags(row), None) for row in training
    ]
    rows += [(row["id"], "test", _lyra_tags(row), None) for row in test]
    return _build("lyra", rows, TOP_K["lyra"], None)


def load_csv_task(path: PathLike, top_k: int | None = None) -> Task:
    """A generic task file of ``path,split,tags`` rows (module docstring); named after the file."""
    path = Path(path)
    with path.open(newline="") as handle:
        lines = [(number, row) for number, row in enumerate(csv.reader(handle), start=1) if row]
    if lines and [cell.strip().lower() for cell in lines[0][1]] == CSV_HEADER:
        lines = lines[1:]
    rows = []
    for number, row in lines:
        if len(row) != 3 or row[1].strip() not in SPLIT_NAMES:
            raise TaskError(
                f"{path}:{number}: expected 'path,split,tags' with split in {SPLIT_NAMES}, got {row}"
            )
        relative = row[0].strip()
        tags = [tag.strip() for tag in row[2].split(TAG_SEPARATOR) if tag.strip()]
        rows.append((Path(relative).stem, row[1].strip(), tags, relative))
    if not rows:
        raise TaskError(f"{path}: lists no recordings")
    return _build(path.stem, rows, top_k, None)


def load_task(
    task: str, splits_root: PathLike, metadata: PathLike | None = None, top_k: int | None = None
) -> Task:
    """A built-in task by name (`BUILTIN_TASKS`, split folder ``<splits_root>/<name>``) or a CSV
    task file by path (`top_k` applies to CSV tasks only; built-in ones use `TOP_K`)."""
    if task in BUILTIN_TASKS:
        splits_dir = Path(splits_root) / task
        try:
            if task == "magnatagatune":
                return load_magnatagatune(splits_dir, metadata)
            if task == "lyra":
                return load_lyra(splits_dir)
            return load_metadata_task(task, splits_dir, metadata)
        except (OSError, SplitError) as error:
            raise TaskError(f"{task}: cannot read its split under {splits_dir} ({error})") from error
    if Path(task).is_file():
        return load_csv_task(task, top_k)
    raise TaskError(f"{task!r}: neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor a CSV task file")


def _audio_index(audio_root: Path) -> dict[str, list[Path]]:
    """Every audio file under `audio_root` by its name without extension."""
    index: dict[str, list[Path]] = {}
    for folder, _, names in os.walk(audio_root):
        for name in names:
            if name.lower().endswith(AUDIO_EXTENSIONS) and not name.startswith("."):
                index.setdefault(Path(name).stem, []).append(Path(folder) / name)
    return index


def _locate(task: Task, audio_root: Path) -> tuple[list[Path | None], list[str], list[str]]:
    """Each recording's audio file (None when not found), the ids without a file and the ids
    with several candidate files."""
    if not audio_root.is_dir():
        raise TaskError(f"{task.name}: the audio root {audio_root} is not a folder")
    found: list[Path | None] = [
        audio_root / path if path is not None and (audio_root / path).is_file() else None
        for path in task.paths
    ]
    index = _audio_index(audio_root) if None in found else {}
    missing, ambiguous = [], []
    for row, recording in enumerate(task.ids):
        if found[row] is None:
            candidates = index.get(recording, [])
            if len(candidates) == 1:
                found[row] = candidates[0]
            elif candidates:
                ambiguous.append(f"{recording} ({', '.join(str(path) for path in candidates[:3])})")
            else:
                missing.append(recording)
    return found, missing, ambiguous


def find_audio(task: Task, audio_root: PathLike) -> list[Path]:
    """The audio file of every recording of `task` under `audio_root` (module docstring).

    Raises `TaskError` naming the task, the audio root and the ids without a file, or with more
    than one candidate file.
    """
    audio_root = Path(audio_root)
    found, missing, ambiguous = _locate(task, audio_root)
    if missing:
        raise TaskError(
            f"{task.name}: {len(missing)} of {len(task)} recordings have no audio file under {audio_root}: "
            f"{listed(missing)}; add them (named <id>.wav/.flac/.mp3/.ogg) or pass --skip-missing"
        )
    if ambiguous:
        raise TaskError(f"{task.name}: several audio files under {audio_root} for {listed(ambiguous)}")
    return [path for path in found if path is not None]


def present_rows(task: Task, audio_root: PathLike) -> tuple[list[int], list[str]]:
    """Rows of `task` with at least one candidate audio file under `audio_root`, and the ids of
    the others."""
    _, missing, _ = _locate(task, Path(audio_root))
    absent = set(missing)
    return [row for row, recording in enumerate(task.ids) if recording not in absent], missing
