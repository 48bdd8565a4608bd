"""The offline token cache: the EnCodec codes of every manifest row, extracted once (thesis 3.2).

MERT's release runs the acoustic teacher once per file and trains from the stored labels. A cache
folder holds

- ``codes.npy``: uint16 [total_frames, 8], memory-mapped at training time;
- ``offsets.npy``: int64 [rows + 1]; row i's codes are ``codes[offsets[i]:offsets[i + 1]]``, and
  ceil(num_samples / 320) frames long (zero for a row skipped as bad audio);
- ``meta.json``: the teacher, the settings, the manifest's path and sha256, the sha256 of the
  audio's contents (`culturemert.fingerprint`; per file in ``audio.json``), the counts and the
  skipped rows. It is written last, so its presence means the cache is complete. A cache is
  refused for another manifest, teacher or audio content (re-cut files under the same names).

Long rows are encoded in chunks of ``chunk_seconds`` (30 s = 9,000 frames) so memory stays
bounded. Every chunk but a row's first is encoded together with the `CONTEXT_SECONDS` of audio
before it, whose frames are dropped: the chunk's first frames then see real audio instead of the
padding and fresh LSTM state of a clip start (EnCodec is trained on 1 s excerpts; on the
data-initialised teacher the start-of-clip effect on the encoder output falls to float32 rounding
within 50 frames, so chunked codes match whole-row codes but for rare float32 near-ties).

Resuming (`culturemert.parts`): rows are grouped into parts of about ``batch_seconds`` of audio,
fixed by the manifest and the options (a rerun with other options is refused); a rerun encodes
only the parts not yet written. A part's teacher batches never depend
on other parts, so on the same machine the result is byte-identical to an uninterrupted run
(float32 rounding depends on the batch shapes, so other batch settings can flip rare near-ties).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from culturemert.audio import FRAME_RATE, HOP_LENGTH, SAMPLE_RATE, AudioError, audio_info, read_crop
from culturemert.data.manifest import Manifest, read_manifest
from culturemert.errors import UserError
from culturemert.files import write_atomically, write_json_atomically
from culturemert.fingerprint import audio_sha256, save_record
from culturemert.parts import Parts
from culturemert.targets.encodec_teacher import (
    BANDWIDTH,
    CODEBOOK_SIZE,
    NUM_CODEBOOKS,
    EncodecTeacher,
)

CHUNK_SECONDS = 30.0
CONTEXT_SECONDS = 1.0
BATCH_SECONDS = 120.0

PathLike = str | os.PathLike


class TokenCacheError(UserError):
    """A token cache that cannot be built or used; the message names the files and the fix."""


@dataclass(frozen=True)
class _Chunk:
    """Samples [start, stop) of a row, encoded as one clip; its first `context` frames are dropped."""

    row: int
    start: int
    stop: int
    context: int

    @property
    def length(self) -> int:
        return self.stop - self.start


def build_token_cache(
    manifest_path: PathLike,
    teacher: EncodecTeacher,
    out_dir: PathLike,
    batch_seconds: float = BATCH_SECONDS,
    chunk_seconds: float = CHUNK_SECONDS,
    skip_bad: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every row of the manifest with `teacher` into the cache folder `out_dir` (see above).

    A teacher call holds at most `batch_seconds` of (padded) audio, or one chunk when a chunk is
    longer. Bad audio (unreadable, empty, NaN, or not the sample rate and length the manifest
    says) raises `AudioError` naming the file; with `skip_bad` the row gets zero frames and is
    listed in meta.json instead. Rerunning on a complete cache does nothing, unless it was built
    from another manifest or teacher: then `TokenCacheError`. Returns `out_dir`.
    """
    manifest = read_manifest(manifest_path)
    out_dir = Path(out_dir)
    chunk_frames = round(chunk_seconds * FRAME_RATE)
    if chunk_frames <= 0 or not math.isclose(chunk_frames, chunk_seconds * FRAME_RATE):
        raise TokenCacheError(f"chunk_seconds={chunk_seconds} must be a positive whole number of frames")
    if batch_seconds <= 0:
        raise TokenCacheError(f"batch_seconds={batch_seconds} must be positive")
    audio, record = audio_sha256(_audio_files(manifest), out_dir, TokenCacheError)
    settings = {
        "teacher": teacher.identity,
        "manifest_sha256": manifest.checksum(),
        "audio_sha256": audio,
        "batch_seconds": batch_seconds,
        "chunk_seconds": chunk_seconds,
        "context_seconds": CONTEXT_SECONDS,
    }
    if (out_dir / "meta.json").is_file():
        _check_complete_cache(out_dir, manifest, settings)
        shutil.rmtree(out_dir / ".partial", ignore_errors=True)
        return out_dir

    batch_samples = round(batch_seconds * SAMPLE_RATE)
    parts = _parts(manifest.num_samples, batch_samples)
    store = Parts(out_dir / ".partial", len(parts), settings, TokenCacheError)
    save_record(out_dir, record)
    seconds = [float(manifest.num_samples[rows].sum()) / SAMPLE_RATE for rows in parts]
    todo = store.pending()
    with tqdm(
        total=sum(seconds),
        initial=sum(seconds) - sum(seconds[index] for index in todo),
        unit="s",
        unit_scale=True,
        desc="extract tokens",
        disable=not progress,
    ) as bar:
        for index in todo:
            counted = bar.n
            arrays = _encode_part(manifest, parts[index], teacher, batch_samples, chunk_frames, skip_bad, bar)
            store.write(index, arrays)
            bar.update(seconds[index] - (bar.n - counted))  # the rest: rows skipped as bad audio
    _finalize(out_dir, manifest, settings, store)
    return out_dir


class TokenCache:
    """A finished token cache opened for training: memory-mapped codes of one manifest's rows."""

    def __init__(self, out_dir: Path, codes: np.ndarray, offsets: np.ndarray, meta: dict) -> None:
        self.out_dir = out_dir
        self.codes = codes
        self.offsets = offsets
        self.meta = meta

    @classmethod
    def open(cls, out_dir: PathLike, manifest: Manifest | PathLike | None = None) -> TokenCache:
        """Open the cache in `out_dir`, refusing an incomplete or inconsistent cache and, when
        `manifest` is given (always, for training), one built from a different manifest."""
        out_dir = Path(out_dir)
        meta_path = out_dir / "meta.json"
        if not meta_path.is_file():
            raise TokenCacheError(f"{out_dir}: incomplete cache (no meta.json); rerun extract_tokens")
        meta = json.loads(meta_path.read_text())
        codes = np.load(out_dir / "codes.npy", mmap_mode="r")
        offsets = np.load(out_dir / "offsets.npy", mmap_mode="r")
        if meta["rows"] != len(offsets) - 1 or offsets[-1] != len(codes):
            raise TokenCacheError(
                f"{out_dir}: codes.npy, offsets.npy and meta.json disagree; delete the folder and rerun "
                "extract_tokens"
            )
        if manifest is not None:
            manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
            rebuild = (
                f"rebuild the cache with scripts/extract_tokens.py --manifest {manifest.path} --out "
                "<new folder>"
            )
            if meta["manifest_sha256"] != manifest.checksum() or meta["rows"] != len(manifest):
                raise TokenCacheError(
                    f"{meta_path} was built from {meta['manifest']}, whose contents differ from "
                    f"{manifest.path}; {rebuild}"
                )
            audio, _ = audio_sha256(_audio_files(manifest), out_dir, TokenCacheError)
            if meta.get("audio_sha256") != audio:
                raise TokenCacheError(
                    f"{meta_path} was built from other audio than {manifest.path} lists (or before audio "
                    f"fingerprints were recorded); {rebuild}"
                )
        return cls(out_dir, codes, offsets, meta)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def num_frames(self, row: int) -> int:
        """Frames cached for `row`: ceil(num_samples / 320), or 0 for a skipped row."""
        return int(self.offsets[row + 1] - self.offsets[row])

    def codes_for(self, row: int, start_frame: int, num_frames: int) -> np.ndarray:
        """int64 codes [num_frames, 8] of frames [start_frame, start_frame + num_frames) of `row`."""
        if not 0 <= row < len(self):
            raise IndexError(f"{self.out_dir}: row {row} out of range for {len(self)} rows")
        available = self.num_frames(row)
        if start_frame < 0 or num_frames < 0 or start_frame + num_frames > available:
            raise IndexError(
                f"{self.out_dir}: frames [{start_frame}, {start_frame + num_frames}) of row {row} run "
                f"past its {available} cached frames"
            )
        first = int(self.offsets[row]) + start_frame
        return self.codes[first : first + num_frames].astype(np.int64)


def _audio_files(manifest: Manifest) -> list[Path]:
    return [manifest.audio_path(row) for row in range(len(manifest))]


def _check_complete_cache(out_dir: Path, manifest: Manifest, settings: dict) -> None:
    """Refuse to treat a complete cache of another manifest, teacher or audio as already done."""
    meta = json.loads((out_dir / "meta.json").read_text())
    if meta["manifest_sha256"] != settings["manifest_sha256"]:
        raise TokenCacheError(
            f"{out_dir} already holds the complete cache of {meta['manifest']}, whose contents differ "
            f"from {manifest.path}; delete {out_dir} or pass another --out"
        )
    if meta["teacher"] != settings["teacher"]:
        raise TokenCacheError(
            f"{out_dir} already holds a complete cache made by another teacher ({meta['teacher']}); "
            f"delete {out_dir} or pass another --out"
        )
    if meta.get("audio_sha256") != settings["audio_sha256"]:
        raise TokenCacheError(
            f"{out_dir} already holds a complete cache made from other audio (or before audio "
            f"fingerprints were recorded); delete {out_dir} or pass another --out"
        )


def _parts(num_samples: np.ndarray, batch_samples: int) -> list[range]:
    """Consecutive rows grouped into parts of at most `batch_samples` samples (at least one row)."""
    parts, first, total = [], 0, 0
    for row, length in enumerate(num_samples.tolist()):
        if row > first and total + length > batch_samples:
            parts.append(range(first, row))
            first, total = row, 0
        total += length
    parts.append(range(first, len(num_samples)))
    return parts


def _chunks(row: int, num_samples: int, chunk_frames: int) -> list[_Chunk]:
    """Split a row into chunks of `chunk_frames` frames, each after the first with its context."""
    context_frames = round(CONTEXT_SECONDS * FRAME_RATE)
    chunks = []
    for first_frame in range(0, math.ceil(num_samples / HOP_LENGTH), chunk_frames):
        context = min(first_frame, context_frames)
        stop = min((first_frame + chunk_frames) * HOP_LENGTH, num_samples)
        chunks.append(_Chunk(row, (first_frame - context) * HOP_LENGTH, stop, context))
    return chunks


def _batches(chunks: list[_Chunk], batch_samples: int) -> list[list[_Chunk]]:
    """Consecutive chunks grouped so that each group, padded to its longest, fits `batch_samples`."""
    batches: list[list[_Chunk]] = []
    longest = 0
    for chunk in chunks:
        if batches and (len(batches[-1]) + 1) * max(longest, chunk.length) <= batch_samples:
            batches[-1].append(chunk)
            longest = max(longest, chunk.length)
        else:
            batches.append([chunk])
            longest = chunk.length
    return batches


def _check_row(manifest: Manifest, row: int) -> None:
    """Raise AudioError unless the row's file is readable at 24 kHz with the manifest's length."""
    path = manifest.audio_path(row)
    num_samples, sample_rate, _ = audio_info(path)
    if sample_rate != SAMPLE_RATE or num_samples != manifest.num_samples[row]:
        raise AudioError(
            f"{path}: {num_samples} samples at {sample_rate} Hz, but {manifest.path} lists "
            f"{manifest.num_samples[row]} samples at {SAMPLE_RATE} Hz; rebuild the manifest"
        )


def _encode_part(
    manifest: Manifest,
    rows: range,
    teacher: EncodecTeacher,
    batch_samples: int,
    chunk_frames: int,
    skip_bad: bool,
    bar: tqdm,
) -> dict[str, np.ndarray]:
    """Codes of the part's rows, concatenated, with each row's frame count and the skipped rows."""
    bad: dict[int, str] = {}

    def reject(row: int, error: AudioError) -> None:
        if not skip_bad:
            raise error
        bad[row] = str(error)

    chunks = []
    for row in rows:
        try:
            _check_row(manifest, row)
            chunks += _chunks(row, int(manifest.num_samples[row]), chunk_frames)
        except AudioError as error:
            reject(row, error)
    pieces: dict[int, list[np.ndarray]] = {row: [] for row in rows}
    for batch in _batches(chunks, batch_samples):
        clips = []
        for chunk in batch:
            if chunk.row in bad:
                continue
            try:
                audio = read_crop(manifest.audio_path(chunk.row), chunk.start, chunk.length)
            except AudioError as error:
                reject(chunk.row, error)
                continue
            clips.append((chunk, audio))
        if clips:
            longest = max(len(audio) for _, audio in clips)
            wav = torch.from_numpy(np.stack([np.pad(audio, (0, longest - len(audio))) for _, audio in clips]))
            codes = teacher.codes(wav).cpu().numpy().astype(np.uint16)
            for (chunk, audio), clip_codes in zip(clips, codes):
                pieces[chunk.row].append(clip_codes[chunk.context : math.ceil(len(audio) / HOP_LENGTH)])
        bar.update(sum(chunk.length - chunk.context * HOP_LENGTH for chunk in batch) / SAMPLE_RATE)
    empty = np.zeros((0, NUM_CODEBOOKS), dtype=np.uint16)
    row_codes = [empty if row in bad else np.concatenate(pieces[row]) for row in rows]
    return {
        "codes": np.concatenate(row_codes),
        "frames": np.array([len(codes) for codes in row_codes], dtype=np.int64),
        "bad_rows": np.array(sorted(bad), dtype=np.int64),
        "bad_reasons": np.array([bad[row] for row in sorted(bad)], dtype=str),
    }


def _finalize(out_dir: Path, manifest: Manifest, settings: dict, store: Parts) -> None:
    """Join the parts into codes.npy and offsets.npy, then write meta.json and drop `.partial`."""
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(list(store.arrays("frames"))))]).astype(np.int64)
    skipped = [
        {"row": row, "file": manifest.files[row], "reason": reason}
        for rows, reasons in zip(store.arrays("bad_rows"), store.arrays("bad_reasons"))
        for row, reason in zip(rows.tolist(), reasons.tolist())
    ]
    store.write_joined(out_dir / "codes.npy", "codes", "<u2", (int(offsets[-1]), NUM_CODEBOOKS))
    write_atomically(out_dir / "offsets.npy", lambda handle: np.save(handle, offsets))
    meta = {
        **settings,
        "bandwidth": BANDWIDTH,
        "sample_rate": SAMPLE_RATE,
        "frame_rate": FRAME_RATE,
        "num_codebooks": NUM_CODEBOOKS,
        "codebook_size": CODEBOOK_SIZE,
        "manifest": str(manifest.path),
        "rows": len(manifest),
        "total_frames": int(offsets[-1]),
        "skipped": skipped,
    }
    write_json_atomically(out_dir / "meta.json", meta)
    store.remove()
