"""Frozen-model features of a probing task, extracted once into a cache folder (thesis 3.5.2).

Every recording is decoded block-wise up to its duration cut (`culturemert.audio.stream_audio`)
and chunked (`chunking`) as it is decoded, so memory is bounded by the window, not the file (with
``normalize`` or DataLoader workers, by the cut recording, which is held whole); each
chunk is encoded by the frozen model in eval mode (`MertModel.hidden_states`, float32, or 16-bit
autocast on CUDA: `culturemert.probing.precision`) and each of
its hidden states (13 for MERT-v1-95M: the transformer input and the 12 layer outputs) is
mean-pooled over the chunk's frames. Chunks of equal length are batched together, across
recordings, and nothing is padded: the first conv layer's GroupNorm normalises over time, so
padding would change the features of the shorter chunks.

The cache folder's files, and how a complete one is opened and checked: `feature_cache`.

Never non-finite: a model with NaN or infinite weights is refused before any work, and a pooled
feature that is not finite or beyond float16's range (65504) stops the extraction with the
recording's id; a cache marked complete holds only finite values.

Bad audio (corrupt, truncated, or shorter than the conv stack's receptive field) is an error
naming the file, or, with ``skip_bad``, a recording dropped from the cache and listed in
meta.json with the reason.

Resuming (`culturemert.parts`): recordings are grouped into parts of ``part_recordings`` in task
order; a rerun with the same settings encodes only the parts not yet written. A part is encoded
the same way whatever happened before it, so the result equals that of an uninterrupted run. A
run that stopped before writing any part keeps nothing: the rerun starts afresh, with its own
settings and audio.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from culturemert.audio import SAMPLE_RATE, AudioError, load_audio, stream_audio
from culturemert.checkpoint import load_model
from culturemert.errors import listing
from culturemert.files import write_atomically, write_json_atomically
from culturemert.fingerprint import AUDIO_RECORD, audio_sha256, model_sha256, save_record
from culturemert.models.mert import MertModel, conv_output_lengths
from culturemert.parts import Parts
from culturemert.probing.chunking import MIN_LAST_SECONDS, WINDOW_SECONDS, recording_chunks, stream_chunks
from culturemert.probing.feature_cache import FeatureCacheError, check_complete
from culturemert.probing.precision import check_precision, computation
from culturemert.probing.tasks import Task

PART_RECORDINGS = 256
BATCH_SIZE = 8
PENDING_BATCHES = 8  # chunks waiting for a same-length partner are encoded once this many batches wait
FEATURE_DTYPE = "<f2"
FEATURE_MAX = float(np.finfo(np.float16).max)

PathLike = str | os.PathLike


class _RecordingAudio(Dataset):
    """The chunks of each recording (decoding happens here, in DataLoader workers if asked). In
    this process (`lazy`) a recording's chunks come as they are decoded, so memory is bounded by
    the window, not the file; a DataLoader worker sends them as one list, or the reason the
    recording cannot be used. With ``normalize`` the whole cut recording is decoded first: its
    mean and variance are the whole recording's."""

    def __init__(self, rows: list[int], files: list[Path], settings: dict, min_samples: int, lazy: bool):
        self.rows = rows
        self.files = files
        self.settings = settings
        self.min_samples = min_samples
        self.lazy = lazy

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, Iterable[np.ndarray] | str]:
        row = self.rows[index]
        chunks = self.chunks(self.files[row])
        if self.lazy:
            return row, chunks
        try:
            return row, list(chunks)
        except AudioError as error:
            return row, str(error)

    def chunks(self, path: Path) -> Iterator[np.ndarray]:
        """The recording's chunks (`chunking`); an `AudioError` where it cannot be decoded or is
        shorter than the receptive field, raised as it is met."""
        settings, bounds = self.settings, (self.settings["window_seconds"], self.settings["min_last_seconds"])
        if settings["normalize"]:
            wav = load_audio(path, max_seconds=settings["max_seconds"])
            chunks = iter(recording_chunks(wav, None, True, SAMPLE_RATE, *bounds) if len(wav) else [])
        else:
            chunks = stream_chunks(
                stream_audio(path, max_seconds=settings["max_seconds"]), SAMPLE_RATE, *bounds
            )
        first = next(chunks, np.zeros(0, np.float32))
        if len(first) < self.min_samples:  # the first chunk is a whole window or the whole recording
            raise AudioError(
                f"{path}: {len(first)} samples, shorter than the model's receptive field of "
                f"{self.min_samples} samples ({1000 * self.min_samples / SAMPLE_RATE:.1f} ms); drop it"
            )
        yield first
        yield from chunks


def _as_is(item: tuple[int, Iterable[np.ndarray] | str]) -> tuple[int, Iterable[np.ndarray] | str]:
    return item


def default_model_name(model_path: Path) -> str:
    """A report name for a model: a checkpoint's stem, or an HF folder with its parent (``runs/a/hf``
    is ``a/hf``), so the HF folders of two runs get different names."""
    model_path = model_path.resolve()
    return f"{model_path.parent.name}/{model_path.name}" if model_path.is_dir() else model_path.stem


def receptive_field(model: MertModel) -> int:
    """The fewest samples the conv stack turns into one frame (400 for MERT-v1-95M)."""
    samples = 1
    while conv_output_lengths(torch.tensor(samples), model.cfg.conv_layers) < 1:
        samples += 1
    return samples


def check_weights(model: MertModel, model_path: Path) -> None:
    """Refuse a model with NaN or infinite weights: its features would be NaN."""
    bad = [
        name
        for name, value in model.state_dict().items()
        if value.is_floating_point() and not value.isfinite().all()
    ]
    if bad:
        raise FeatureCacheError(
            f"{model_path}: NaN or infinite weights in {listing(bad)}; the training run diverged, "
            "probe an earlier checkpoint"
        )


def encode_chunks(
    model: MertModel, chunks: list[np.ndarray], device: torch.device, precision: str = "float32"
) -> np.ndarray:
    """Mean-pooled hidden states float32 [chunks, layers, dim] of equal-length chunks, computed
    in ``precision`` (`culturemert.probing.precision`)."""
    wav = torch.from_numpy(np.stack(chunks)).to(device)
    with computation(precision, device):
        states = model.hidden_states(wav)
    return torch.stack([state.float().mean(dim=1) for state in states], dim=1).cpu().numpy()


class _PartEncoder:
    """Collects the chunks of one part, encodes them in same-length batches, returns the arrays;
    a recording whose audio cannot be used is an error, or recorded as bad with `skip_bad`."""

    def __init__(
        self,
        model: MertModel,
        device: torch.device,
        precision: str,
        batch_size: int,
        ids: list[str],
        skip_bad: bool,
    ):
        self.model = model
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.ids = ids
        self.skip_bad = skip_bad
        self.chunk_recording: list[int] = []
        self.features: list[np.ndarray | None] = []
        self.waiting: dict[int, list[tuple[int, np.ndarray]]] = {}
        self.bad: dict[int, str] = {}

    def add(self, row: int, chunks: Iterable[np.ndarray] | str) -> None:
        """Take a recording's chunks, or the reason it cannot be used (also an `AudioError` met
        while its chunks come: what was taken of it is dropped)."""
        first = len(self.features)
        try:
            if isinstance(chunks, str):
                raise AudioError(chunks)
            for chunk in chunks:
                slot = len(self.features)
                self.chunk_recording.append(row)
                self.features.append(None)
                group = self.waiting.setdefault(len(chunk), [])
                group.append((slot, chunk))
                if len(group) == self.batch_size:
                    self._encode(len(chunk))
        except AudioError as error:
            if not self.skip_bad:
                raise FeatureCacheError(f"{error} (or pass --skip-bad to drop such recordings)") from None
            self.bad[row] = str(error)
            del self.features[first:], self.chunk_recording[first:]
            for length, group in list(self.waiting.items()):
                self.waiting[length] = [(slot, chunk) for slot, chunk in group if slot < first]
                if not self.waiting[length]:
                    del self.waiting[length]
            return
        if sum(len(group) for group in self.waiting.values()) >= PENDING_BATCHES * self.batch_size:
            for length in list(self.waiting):
                self._encode(length)

    def _encode(self, length: int) -> None:
        group = self.waiting.pop(length)
        pooled = encode_chunks(self.model, [chunk for _, chunk in group], self.device, self.precision)
        for (slot, _), values in zip(group, pooled):
            if not np.isfinite(values).all() or np.abs(values).max() > FEATURE_MAX:
                recording = self.ids[self.chunk_recording[slot]]
                raise FeatureCacheError(
                    f"recording {recording}: the model's features are non-finite or beyond float16's "
                    f"range (largest magnitude {np.abs(values).max():g}); check the checkpoint and the audio"
                )
            self.features[slot] = values.astype(FEATURE_DTYPE)

    def finish(self) -> dict[str, np.ndarray]:
        for length in list(self.waiting):
            self._encode(length)
        width = (len(self.model.encoder.layers) + 1, self.model.cfg.encoder_embed_dim)
        return {
            "features": np.stack(self.features) if self.features else np.zeros((0, *width), FEATURE_DTYPE),
            "chunk_recording": np.asarray(self.chunk_recording, dtype=np.int64),
            "bad_rows": np.asarray(sorted(self.bad), dtype=np.int64),
            "bad_reasons": np.asarray([self.bad[row] for row in sorted(self.bad)], dtype=str),
        }


def check_window(window_seconds: float, min_samples: int) -> None:
    """Refuse a chunk window shorter than the model's receptive field of `min_samples`."""
    if not round(window_seconds * SAMPLE_RATE) >= min_samples:
        raise FeatureCacheError(
            f"--window-seconds {window_seconds:g}: shorter than the model's receptive field of "
            f"{min_samples} samples ({1000 * min_samples / SAMPLE_RATE:.1f} ms); pass a longer window"
        )


def _drop_unstarted(out_dir: Path) -> None:
    """Remove what an earlier run left in `out_dir` before it wrote any part (a `.partial` of
    settings only, audio.json), so a rerun with other settings or repaired inputs starts afresh."""
    partial = out_dir / ".partial"
    if (out_dir / "meta.json").is_file() or any(partial.glob("part-*.npz")):
        return
    shutil.rmtree(partial, ignore_errors=True)
    (out_dir / AUDIO_RECORD).unlink(missing_ok=True)


def _finalize(out_dir: Path, store: Parts, task: Task, settings: dict, model_path: Path) -> None:
    """Join the parts into the cache arrays (dropping recordings skipped as bad audio), write
    meta.json last and drop `.partial`."""
    bad = np.concatenate(list(store.arrays("bad_rows")))
    reasons = [str(reason) for reasons in store.arrays("bad_reasons") for reason in reasons]
    kept = np.setdiff1d(np.arange(len(task)), bad)
    if len(kept) == 0:
        raise FeatureCacheError(f"{task.name}: no recording has usable audio; {reasons[0]}")
    new_row = np.full(len(task), -1, dtype=np.int64)
    new_row[kept] = np.arange(len(kept))
    chunk_recording = new_row[np.concatenate(list(store.arrays("chunk_recording")))]
    if len(chunk_recording) == 0:
        raise FeatureCacheError(f"{task.name}: the recordings gave no chunks; nothing was written")
    layers, dim = next(store.arrays("features")).shape[1:]
    store.write_joined(
        out_dir / "features.npy", "features", FEATURE_DTYPE, (len(chunk_recording), layers, dim)
    )
    kept_task = task.select(kept.tolist())
    write_atomically(out_dir / "chunk_recording.npy", lambda handle: np.save(handle, chunk_recording))
    write_atomically(
        out_dir / "labels.npy", lambda handle: np.save(handle, kept_task.labels.astype(np.uint8))
    )
    meta = {
        **settings,
        "model_path": str(model_path.resolve()),
        "ids": kept_task.ids,
        "splits": kept_task.splits,
        "tags": kept_task.tags,
        "skipped_bad_audio": [{"id": task.ids[row], "reason": reason} for row, reason in zip(bad, reasons)],
        "chunks": len(chunk_recording),
        "layers": int(layers),
        "dim": int(dim),
        "dtype": "float16",
    }
    write_json_atomically(out_dir / "meta.json", meta)
    store.remove()


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
    precision: str = "float32",
    workers: int = 0,
    window_seconds: float = WINDOW_SECONDS,
    min_last_seconds: float = MIN_LAST_SECONDS,
    skipped: list[str] | None = None,
    progress: bool = True,
    skip_bad: bool = False,
    trust_checkpoint: bool = False,
) -> Path:
    """Extract the features of every recording of `task` (audio `audio_files`, row-aligned) with the
    model at `model_path` into the cache folder `out_dir`, resuming unfinished work (module
    docstring). `skipped` lists ids already dropped for missing audio, recorded in meta.json;
    with `skip_bad` recordings with unusable audio are dropped and recorded too; `trust_checkpoint`
    as in `load_model`; `precision` of the model's arithmetic (`culturemert.probing.precision`),
    part of the cache's settings. Rerunning on a
    complete cache of the same task, model, audio and settings does nothing. Returns `out_dir`.
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
    try:
        check_precision(precision, device)
    except ValueError as error:
        raise FeatureCacheError(str(error)) from None
    out_dir = Path(out_dir)
    model_path = Path(model_path)
    if not model_path.exists():
        raise FeatureCacheError(f"{model_path}: no such model; pass a fairseq .pt file or an HF folder")
    _drop_unstarted(out_dir)
    audio, record = audio_sha256(audio_files, out_dir, FeatureCacheError)
    settings = {
        "task": task.name,
        "task_sha256": task.checksum(),
        "audio_sha256": audio,
        "model": model_name or default_model_name(model_path),
        "model_sha256": model_sha256(model_path),
        "normalize": normalize,
        "max_seconds": task.max_seconds,
        "window_seconds": window_seconds,
        "min_last_seconds": min_last_seconds,
        "sample_rate": SAMPLE_RATE,
        "precision": precision,
        "part_recordings": part_recordings,
        "skipped_missing_audio": sorted(skipped or []),
    }
    if (out_dir / "meta.json").is_file():
        check_complete(out_dir, settings)
        return out_dir
    device = torch.device(device)
    model = load_model(model_path, device, trust_checkpoint=trust_checkpoint)
    check_weights(model, model_path)
    min_samples = receptive_field(model)
    check_window(window_seconds, min_samples)
    parts = [
        range(first, min(first + part_recordings, len(task)))
        for first in range(0, len(task), part_recordings)
    ]
    store = Parts(out_dir / ".partial", len(parts), settings, FeatureCacheError)
    save_record(out_dir, record)
    pending = store.pending()
    rows = [row for index in pending for row in parts[index]]
    audio = _RecordingAudio(rows, audio_files, settings, min_samples, lazy=workers == 0)
    loader = DataLoader(audio, batch_size=None, num_workers=workers, collate_fn=_as_is)
    bar = tqdm(
        total=len(task),
        initial=len(task) - len(rows),
        unit="rec",
        desc=f"{task.name} features",
        disable=not progress,
    )
    recordings = iter(loader)
    for index in pending:
        encoder = _PartEncoder(model, device, precision, batch_size, task.ids, skip_bad)
        for _ in parts[index]:
            row, chunks = next(recordings)
            encoder.add(row, chunks)
            bar.update(1)
        store.write(index, encoder.finish())
    bar.close()
    _finalize(out_dir, store, task, settings, model_path)
    return out_dir
