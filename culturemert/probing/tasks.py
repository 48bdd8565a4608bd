"""Probing tasks: tagged recordings on a train/valid/test split (thesis 3.5.2).

A `Task` lists each recording's id, split and multi-hot labels over a tag vocabulary. The six
datasets of the evaluation are read from the published splits shipped with the package
(`culturemert.data.splits.DEFAULT_SPLITS_ROOT`):

| task | split files | tags (top k, `TOP_K`) |
| --- | --- | --- |
| makam | train/valid/test.npy + the user's Dunya metadata | 30: makam, usul, instruments |
| hindustani, carnatic | the same | 20 each: raga, tala, instruments, forms |
| lyra | training.tsv, valid.txt (carve), test.tsv | 30: ``instrument:Voice``, ``genre:Laiko``, ... |
| fma | train/valid/test.npy, metadata.json (id -> genres) | 20 hierarchical genres |
| magnatagatune | tags.npy, valid.npy, test.npy + train.npy, binary.npy | the 50 of tags.npy |

Dunya's metadata is not redistributable and comes from the user as JSON, CSV or TSV (layouts:
`culturemert.probing.tag_metadata`); a pickled ``metadata.npy`` is refused unless the user trusts
it (``trust_pickle``). MagnaTagATune's train.npy and binary.npy are the public
minzwon/sota-music-tagging-models files, too large to ship with the splits: the user passes the
folder holding them. Every other file is read without pickle.

Any other tagged collection is a CSV task file of ``path,split,tags`` rows (header optional):
path relative to the audio root (or absolute), split one of train/valid/test, tags separated by
``|``; the recording id is the file name without extension; the vocabulary is every tag with a
training positive (or the top k of them).

Decisions:

- Top-k tags are counted over the training split only (ties broken by name), so the test split
  chooses nothing. A recording none of whose tags made the vocabulary keeps an all-zero row.
  Tags that occur only in the valid or test split are left out and logged by name.
- Lyra's validation set is the fixed list ``lyra/valid.txt`` shipped with the splits (how it was
  made: `lyra_valid_carve`); data preparation's leak guard refuses the same ids.
- Audio of a recording is ``<audio root>/<path>`` where its split names a path (magnatagatune,
  CSV tasks) and that file exists; otherwise the single audio file anywhere under the audio root
  whose name without extension is the id (``fma_medium/000/000002.mp3`` for fma id ``000002``),
  with any extension of `culturemert.audio.AUDIO_EXTENSIONS`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from culturemert.audio import AUDIO_EXTENSIONS, find_audio_files
from culturemert.data.splits import (
    DEFAULT_SPLITS_ROOT,
    SPLIT_NAMES,
    TABLE_ENCODING,
    SplitError,
    load_string_array,
    read_split,
    table_rows,
)
from culturemert.errors import UserError, listing
from culturemert.probing.tag_metadata import TAG_SEPARATOR, MetadataError, read_metadata

logger = logging.getLogger(__name__)

# In the order of the thesis tables: non-Western, then Western.
TOP_K = {"makam": 30, "hindustani": 20, "carnatic": 20, "lyra": 30, "fma": 20, "magnatagatune": 50}
MAX_SECONDS = {"makam": 150.0, "hindustani": 780.0, "carnatic": 330.0}  # per-dataset cut (thesis 3.5.2)
BUILTIN_TASKS = tuple(TOP_K)
COMPMUSIC_TASKS = ("makam", "hindustani", "carnatic")
LYRA_COLUMNS = {"instruments": "instrument", "genres": "genre", "place": "place"}
LYRA_ABSENT = "None"  # how Lyra's table marks an empty field
LYRA_VALID_FRACTION = 0.1
LYRA_VALID_SEED = 0
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
        raise TaskError(f"{name}: recording ids listed more than once: {listing(repeated)}")
    if vocabulary is None:
        vocabulary = top_tags((tags for _, split, tags, _ in rows if split == "train"), k)
    if not vocabulary:
        raise TaskError(f"{name}: no tag has a positive in the training split")
    trained = {tag for _, split, tags, _ in rows if split == "train" for tag in tags}
    untrained = sorted({tag for _, split, tags, _ in rows if split != "train" for tag in tags} - trained)
    if untrained:
        logger.warning(
            "%s: %d tag(s) occur only outside the training split and are left out: %s",
            name, len(untrained), listing(untrained),
        )  # fmt: skip
    column = {tag: index for index, tag in enumerate(vocabulary)}
    labels = np.zeros((len(rows), len(vocabulary)), dtype=np.uint8)
    for row, (_, _, tags, _) in enumerate(rows):
        labels[row, [column[tag] for tag in tags if tag in column]] = 1
    splits = [row[1] for row in rows]
    return Task(name, ids, splits, list(vocabulary), labels, [row[3] for row in rows], max_seconds)


def load_metadata_task(
    name: str, splits_dir: PathLike, metadata_path: PathLike | None = None, trust_pickle: bool = False
) -> Task:
    """fma, makam, hindustani or carnatic: train/valid/test.npy ids tagged by `read_metadata`
    (fma's metadata.json ships in `splits_dir`; CompMusic's comes from the user), top-k of `TOP_K`."""
    splits_dir = Path(splits_dir)
    if metadata_path is None:
        if name in COMPMUSIC_TASKS:
            raise TaskError(
                f"{name}: the Dunya tag metadata is not redistributable; pass --metadata with a "
                "JSON file of recording id -> tags (the layout of fma/metadata.json) or an id,tags CSV/TSV"
            )
        metadata_path = splits_dir / "metadata.json"
    try:
        metadata = read_metadata(metadata_path, trust_pickle)
    except MetadataError as error:
        raise TaskError(f"{name}: {error}") from error
    split = read_split(splits_dir, trust_pickle)
    rows, untagged = [], []
    for split_name in SPLIT_NAMES:
        for recording in split.ids.get(split_name, []):
            if recording not in metadata:
                untagged.append(recording)
            rows.append((recording, split_name, metadata.get(recording, []), None))
    if untagged:
        raise TaskError(f"{name}: {metadata_path} has no tags for {len(untagged)} ids: {listing(untagged)}")
    return _build(name, rows, TOP_K[name], MAX_SECONDS.get(name))


def _mtat_rows(path: Path, trust_pickle: bool) -> list[tuple[int, str]]:
    """(row of binary.npy, relative clip path) of a minzwon split file of ``index<TAB>path`` rows."""
    try:
        return [
            (int(index), clip)
            for index, clip in (row.split("\t") for row in load_string_array(path, trust_pickle))
        ]
    except ValueError as error:
        raise TaskError(
            f"{path}: expected a .npy array of 'index<TAB>dir/clip.mp3' rows ({error})"
        ) from error


def load_magnatagatune(
    splits_dir: PathLike, metadata_dir: PathLike | None, trust_pickle: bool = False
) -> Task:
    """MagnaTagATune on the minzwon split: valid/test lists and the 50 tags from `splits_dir`, the
    training list train.npy and the label matrix binary.npy from `metadata_dir`."""
    splits_dir = Path(splits_dir)
    if metadata_dir is None:
        raise TaskError(
            "magnatagatune: pass --metadata with the folder holding train.npy and binary.npy of the "
            "minzwon/sota-music-tagging-models split (they are too large to ship with the splits)"
        )
    metadata_dir = Path(metadata_dir)
    tags = load_string_array(splits_dir / "tags.npy")
    binary_path = metadata_dir / "binary.npy"
    if not binary_path.is_file() or not (metadata_dir / "train.npy").is_file():
        raise TaskError(f"magnatagatune: {metadata_dir} must hold train.npy and binary.npy")
    try:
        binary = np.load(binary_path, allow_pickle=False)
    except ValueError as error:
        raise TaskError(
            f"{binary_path}: expected a numeric label matrix, read without pickle ({error})"
        ) from error
    if binary.ndim != 2 or binary.shape[1] != len(tags):
        raise TaskError(f"{binary_path}: expected [clips, {len(tags)}] labels, got shape {binary.shape}")
    rows = []
    for split_name, folder in (("train", metadata_dir), ("valid", splits_dir), ("test", splits_dir)):
        for index, clip in _mtat_rows(folder / f"{split_name}.npy", trust_pickle):
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
    with path.open(newline="", encoding=TABLE_ENCODING) as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = sorted({"id", *LYRA_COLUMNS} - set(reader.fieldnames or []))
        if missing:
            raise TaskError(f"{path}: missing columns {', '.join(missing)}")
        return list(reader)


def lyra_valid_carve(train_ids: Sequence[str]) -> set[str]:
    """How the shipped ``lyra/valid.txt`` was made (once; probing reads the file): the first
    `LYRA_VALID_FRACTION` of a permutation of the sorted training ids drawn with `LYRA_VALID_SEED`."""
    ordered = sorted(train_ids)
    permutation = np.random.default_rng(LYRA_VALID_SEED).permutation(len(ordered))
    return {ordered[i] for i in permutation[: round(LYRA_VALID_FRACTION * len(ordered))]}


def load_lyra(splits_dir: PathLike) -> Task:
    """Lyra: training.tsv less the validation carve (train), the carve (valid) and test.tsv,
    top 30 tags."""
    splits_dir = Path(splits_dir)
    training = _read_lyra_table(splits_dir / "training.tsv")
    test = _read_lyra_table(splits_dir / "test.tsv")
    valid = set(read_split(splits_dir).ids["valid"])
    rows = [
        (row["id"], "valid" if row["id"] in valid else "train", _lyra_tags(row), None) for row in training
    ]
    rows += [(row["id"], "test", _lyra_tags(row), None) for row in test]
    return _build("lyra", rows, TOP_K["lyra"], None)


def load_csv_task(path: PathLike, top_k: int | None = None) -> Task:
    """A generic task file of ``path,split,tags`` rows (module docstring); named after the file."""
    path = Path(path)
    rows = []
    for number, row in table_rows(path, CSV_HEADER):
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
    task: str,
    splits_root: PathLike = DEFAULT_SPLITS_ROOT,
    metadata: PathLike | None = None,
    top_k: int | None = None,
    trust_pickle: bool = False,
) -> Task:
    """A built-in task by name (`BUILTIN_TASKS`, split folder ``<splits_root>/<name>``, the
    shipped splits by default) or a CSV task file by path (`top_k` applies to CSV tasks only;
    built-in ones use `TOP_K`). `trust_pickle` lets pickled ``.npy`` metadata and split files load."""
    if task in BUILTIN_TASKS:
        splits_dir = Path(splits_root) / task
        try:
            if task == "magnatagatune":
                return load_magnatagatune(splits_dir, metadata, trust_pickle)
            if task == "lyra":
                return load_lyra(splits_dir)
            return load_metadata_task(task, splits_dir, metadata, trust_pickle)
        except (OSError, SplitError) as error:
            raise TaskError(f"{task}: cannot read its split under {splits_dir} ({error})") from error
    if Path(task).is_file():
        return load_csv_task(task, top_k)
    raise TaskError(f"{task!r}: neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor a CSV task file")


def _locate(task: Task, audio_root: Path) -> tuple[list[Path | None], list[str], list[str]]:
    """Each recording's audio file (None when not found), the ids without a file and the ids
    with several candidate files."""
    if not audio_root.is_dir():
        raise TaskError(f"{task.name}: the audio root {audio_root} is not a folder")
    found: list[Path | None] = [
        audio_root / path if path is not None and (audio_root / path).is_file() else None
        for path in task.paths
    ]
    index = find_audio_files(audio_root) if None in found else {}
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
            f"{listing(missing)}; add them (named <id> with an extension of "
            f"{', '.join(AUDIO_EXTENSIONS)}) or pass --skip-missing"
        )
    if ambiguous:
        raise TaskError(f"{task.name}: several audio files under {audio_root} for {listing(ambiguous)}")
    return [path for path in found if path is not None]


def present_rows(task: Task, audio_root: PathLike) -> tuple[list[int], list[str]]:
    """Rows of `task` with at least one candidate audio file under `audio_root`, and the ids of
    the others."""
    _, missing, _ = _locate(task, Path(audio_root))
    absent = set(missing)
    return [row for row, recording in enumerate(task.ids) if recording not in absent], missing
