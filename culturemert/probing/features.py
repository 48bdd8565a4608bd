"""Frozen-model features of a probing task, extracted once into a cache folder (SPEC §5).

Every recording is cut, optionally normalised and chunked (`chunking`); each chunk is encoded by
the frozen model in eval mode and each of its hidden states (13 for MERT-v1-95M: the transformer
input and the 12 layer outputs) is mean-pooled over the chunk's frames. Chunks of equal length are
batched together and nothing is padded: the first conv layer's GroupNorm normalises over time, so
padding would change the features of the shorter chunks.

A cache folder holds

- ``features.npy``: float16 [chunks, layers, dim], memory-mapped by the probe;
- ``chunk_recording.npy``: int64 [chunks], the task row each chunk comes from (rows in order);
- ``labels.npy``: uint8 [recordings, tags];
- ``meta.json``: the task (name, checksum, ids, splits, tags), the model (name, path, sha256),
  the chunking and normalisation settings, the shapes and the ids skipped for missing audio. It is
  written last, so its presence means the cache is complete. The model is identified by its
  sha256, so a moved checkpoint still matches its cache.

Resuming: recordings are grouped into parts of ``part_recordings`` in task order; each finished
part is written atomically to ``.partial/part-NNNNNN.npz`` beside ``.partial/settings.json``, and a
rerun with the same settings encodes only the missing parts (after an exception or a SIGKILL
alike). A part is encoded the same way whatever happened before it, so the result equals that of
an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from culturemert.audio import SAMPLE_RATE, load_audio
from culturemert.checkpoint import load_model
from culturemert.errors import UserError
from culturemert.files import part_path, start_or_resume, write_atomically, write_json_atomically
from culturemert.models.mert import MertModel
from culturemert.probing.chunking import MIN_LAST_SECONDS, WINDOW_SECONDS, recording_chunks
from culturemert.probing.tasks import Task

PART_RECORDINGS = 256
BATCH_SIZE = 8
PENDING_BATCHES = 8  # chunks waiting for a same-length partner are encoded once this many batches wait
FEATURE_DTYPE = "<f2"
HASH_BLOCK = 1 << 24

PathLike = str | os.PathLike


class FeatureCacheError(UserError):
    """A feature cache that cannot be built or used; the message names the folder and the fix."""


def model_checksum(path: PathLike) -> str:
    """sha256 of a fairseq ``.pt`` file, or of an HF folder's config and weight files."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureCache:
    """A complete cache folder, its arrays memory-mapped (see the module docstring)."""

    path: Path
    features: np.ndarray
    chunk_recording: np.ndarray
    labels: np.ndarray
    meta: dict

    @classmethod
    def open(cls, path: PathLike) -> FeatureCache:
        """Open a complete cache, refusing an unfinished one or arrays that disagree."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FeatureCacheError(
                f"{path}: not a complete feature cache (no meta.json); run probe.py extract"
            )
        meta = json.loads(meta_path.read_text())
        features = np.load(path / "features.npy", mmap_mode="r")
        chunk_recording = np.load(path / "chunk_recording.npy")
        labels = np.load(path / "labels.npy")
        shapes_agree = (
            features.shape == (meta["chunks"], meta["layers"], meta["dim"])
            and chunk_recording.shape == (meta["chunks"],)
            and labels.shape == (len(meta["ids"]), len(meta["tags"]))
        )
        if not shapes_agree:
            raise FeatureCacheError(
                f"{path}: arrays and meta.json disagree; delete the folder and re-extract"
            )
        return cls(path, features, chunk_recording, labels, meta)

    @property
    def ids(self) -> list[str]:
        return self.meta["ids"]

    @property
    def splits(self) -> list[str]:
        return self.meta["splits"]

    @property
    def tags(self) -> list[str]:
        return self.meta["tags"]


class _RecordingAudio(Dataset):
    """The chunks of each recording (decoding happens here, in DataLoader workers if asked)."""

    def __init__(self, rows: list[int], files: list[Path], settings: dict):
        self.rows = rows
        self.files = files
        self.settings = settings

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, list[np.ndarray]]:
        row = self.rows[index]
        chunks = recording_chunks(
            load_audio(self.files[row]),
            self.settings["max_seconds"],
            self.settings["normalize"],
            SAMPLE_RATE,
            self.settings["window_seconds"],
            self.settings["min_last_seconds"],
        )
        return row, chunks


def _as_is(item: tuple[int, list[np.ndarray]]) -> tuple[int, list[np.ndarray]]:
    return item


def encode_chunks(model: MertModel, chunks: list[np.ndarray], device: torch.device) -> np.ndarray:
    """Mean-pooled hidden states float32 [chunks, layers, dim] of equal-length chunks."""
    wav = torch.from_numpy(np.stack(chunks)).to(device)
    with torch.inference_mode():
        states = model.hidden_states(wav)
    return torch.stack([state.float().mean(dim=1) for state in states], dim=1).cpu().numpy()


class _PartEncoder:
    """Collects the chunks of one part, encodes them in same-length batches, returns the arrays."""

    def __init__(self, model: MertModel, device: torch.device, batch_size: int):
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.chunk_recording: list[int] = []
        self.features: list[np.ndarray | None] = []
        self.waiting: dict[int, list[tuple[int, np.ndarray]]] = {}

    def add(self, row: int, chunks: list[np.ndarray]) -> None:
        for chunk in chunks:
            slot = len(self.features)
            self.chunk_recording.append(row)
            self.features.append(None)
            group = self.waiting.setdefault(len(chunk), [])
            group.append((slot, chunk))
            if len(group) == self.batch_size:
                self._encode(len(chunk))
        if sum(len(group) for group in self.waiting.values()) >= PENDING_BATCHES * self.batch_size:
            for length in list(self.waiting):
                self._encode(length)

    def _encode(self, length: int) -> None:
        group = self.waiting.pop(length)
        pooled = encode_chunks(self.model, [chunk for _, chunk in group], self.device)
        for (slot, _), values in zip(group, pooled):
            self.features[slot] = values.astype(FEATURE_DTYPE)

    def finish(self) -> dict[str, np.ndarray]:
        for length in list(self.waiting):
            self._encode(length)
        return {
            "features": np.stack(self.features),
            "chunk_recording": np.asarray(self.chunk_recording, dtype=np.int64),
        }


def _check_complete(out_dir: Path, settings: dict) -> None:
    """Refuse a complete cache in `out_dir` that was made from another task, model or settings."""
    meta = json.loads((out_dir / "meta.json").read_text())
    changed = sorted(key for key, value in settings.items() if meta.get(key) != value)
    if changed:
        raise FeatureCacheError(
            f"{out_dir} already holds a complete cache made with other {', '.join(changed)}; delete it "
            "or pass another --out"
        )


def _finalize(
    out_dir: Path, partial: Path, num_parts: int, task: Task, settings: dict, model_path: Path
) -> None:
    """Join the parts into the cache arrays, write meta.json last and drop `.partial`."""
    chunk_recording, shape = [], None
    for index in range(num_parts):
        with np.load(part_path(partial, index)) as part:
            chunk_recording.append(part["chunk_recording"])
            shape = part["features"].shape[1:]
    chunk_recording = np.concatenate(chunk_recording)

    def write_features(handle: BinaryIO) -> None:
        header = {"descr": FEATURE_DTYPE, "fortran_order": False, "shape": (len(chunk_recording), *shape)}
        np.lib.format.write_array_header_1_0(handle, header)
        for index in range(num_parts):
            with np.load(part_path(partial, index)) as part:
                handle.write(part["features"].astype(FEATURE_DTYPE).tobytes())

    write_atomically(out_dir / "features.npy", write_features)
    write_atomically(out_dir / "chunk_recording.npy", lambda handle: np.save(handle, chunk_recording))
    write_atomically(out_dir / "labels.npy", lambda handle: np.save(handle, task.labels.astype(np.uint8)))
    meta = {
        **settings,
        "model_path": str(model_path.resolve()),
        "ids": task.ids,
        "splits": task.splits,
        "tags": task.tags,
        "chunks": len(chunk_recording),
        "layers": int(shape[0]),
        "dim": int(shape[1]),
        "dtype": "float16",
    }
    write_json_atomically(out_dir / "meta.json", meta)
    shutil.rmtree(partial)


def extract_features(
    task: Task,
    audio_files: list[Path],
    model_path: PathLike,
    out_dir: PathLike,
    normalize: bool = False,
    model_name: str | None = None,
    batch_size: int = BATCH_SIZE,
    part_recordings: int = PART_RECORDINGS,
    device: str | torch.device = "cpu",
    workers: int = 0,
    window_seconds: float = WINDOW_SECONDS,
    min_last_seconds: float = MIN_LAST_SECONDS,
    skipped: list[str] | None = None,
    progress: bool = True,
) -> Path:
    """Extract the features of every recording of `task` (audio `audio_files`, row-aligned) with the
    model at `model_path` into the cache folder `out_dir`, resuming unfinished work (module
    docstring). `skipped` lists ids already dropped for missing audio, recorded in meta.json.
    Rerunning on a complete cache of the same task, model and settings does nothing. Returns
    `out_dir`.
    """
    if len(task) == 0:
        raise FeatureCacheError(f"{task.name}: no recordings to extract")
    if len(audio_files) != len(task):
        raise FeatureCacheError(
            f"{len(audio_files)} audio files for the {len(task)} recordings of {task.name}"
        )
    if batch_size <= 0 or part_recordings <= 0:
        raise FeatureCacheError(
            f"batch_size={batch_size} and part_recordings={part_recordings} must be positive"
        )
    out_dir = Path(out_dir)
    model_path = Path(model_path)
    if not model_path.exists():
        raise FeatureCacheError(f"{model_path}: no such model; pass a fairseq .pt file or an HF folder")
    settings = {
        "task": task.name,
        "task_sha256": task.checksum(),
        "model": model_name or model_path.stem,
        "model_sha256": model_checksum(model_path),
        "normalize": normalize,
        "max_seconds": task.max_seconds,
        "window_seconds": window_seconds,
        "min_last_seconds": min_last_seconds,
        "sample_rate": SAMPLE_RATE,
        "part_recordings": part_recordings,
        "skipped_missing_audio": sorted(skipped or []),
    }
    if (out_dir / "meta.json").is_file():
        _check_complete(out_dir, settings)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".partial"
    start_or_resume(partial, settings, FeatureCacheError)
    parts = [
        range(first, min(first + part_recordings, len(task)))
        for first in range(0, len(task), part_recordings)
    ]
    pending = [index for index in range(len(parts)) if not part_path(partial, index).is_file()]
    device = torch.device(device)
    model = load_model(model_path, device)
    rows = [row for index in pending for row in parts[index]]
    loader = DataLoader(
        _RecordingAudio(rows, audio_files, settings), batch_size=None, num_workers=workers, collate_fn=_as_is
    )
    bar = tqdm(
        total=len(task),
        initial=len(task) - len(rows),
        unit="rec",
        desc=f"{task.name} features",
        disable=not progress,
    )
    recordings = iter(loader)
    for index in pending:
        encoder = _PartEncoder(model, device, batch_size)
        for _ in parts[index]:
            row, chunks = next(recordings)
            encoder.add(row, chunks)
            bar.update(1)
        arrays = encoder.finish()
        write_atomically(part_path(partial, index), lambda handle, arrays=arrays: np.savez(handle, **arrays))
    bar.close()
    _finalize(out_dir, partial, len(parts), task, settings, model_path)
    return out_dir
