"""Reading audio for the project: mono float32 waveforms at MERT's 24 kHz.

soundfile decodes (WAV, FLAC, OGG, MP3; partial reads without decoding the whole file) and soxr
resamples, so torchaudio is never needed. Every failure is an `AudioError` naming the file, the
problem and the fix.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from culturemert.errors import UserError

# MERT's time grid (thesis 3.2): 24 kHz audio, one model frame and one EnCodec code per 320
# samples, 75 frames per second.
SAMPLE_RATE = 24000
HOP_LENGTH = 320
FRAME_RATE = SAMPLE_RATE // HOP_LENGTH

# Audio files the tools look for, by extension (lower case); soundfile decodes each of them.
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aif", ".aiff")

PathLike = str | os.PathLike


class AudioError(UserError):
    """An audio file that cannot be used; the message names the file, the problem and the fix."""


def find_audio_files(folder: PathLike) -> dict[str, list[Path]]:
    """Audio files below `folder` (any depth, `AUDIO_EXTENSIONS` in any case, hidden files left
    out) by recording id, the file name without its extension; each id's paths sorted."""
    found: dict[str, list[Path]] = {}
    for parent, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            stem, extension = os.path.splitext(name)
            if extension.lower() in AUDIO_EXTENSIONS and not name.startswith("."):
                found.setdefault(stem, []).append(Path(parent) / name)
    return found


def _open(path: Path) -> sf.SoundFile:
    """Open `path` for reading, turning a missing, unreadable or empty file into an AudioError."""
    if not path.is_file():
        raise AudioError(f"{path}: no such file; check the path or rebuild the manifest listing it")
    try:
        audio_file = sf.SoundFile(path)
    except sf.SoundFileError as err:
        raise AudioError(
            f"{path}: not readable as audio ({err}); convert it to WAV/FLAC/OGG/MP3 or drop it"
        ) from err
    if audio_file.frames == 0:
        audio_file.close()
        raise AudioError(f"{path}: contains no samples; remove it from the data")
    return audio_file


def _to_mono(frames: np.ndarray, path: Path) -> np.ndarray:
    """Average the channels of a (num_frames, channels) block and reject NaN or infinite samples."""
    mono = frames.mean(axis=1, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: contains NaN or infinite samples; re-export or drop the file")
    return mono


def audio_info(path: PathLike) -> tuple[int, int, int]:
    """Return (num_samples, sample_rate, channels) of a non-empty audio file from its header."""
    path = Path(path)
    with _open(path) as audio_file:
        return audio_file.frames, audio_file.samplerate, audio_file.channels


BLOCK_SECONDS = 30.0  # source audio decoded at a time by `stream_audio`


def stream_audio(
    path: PathLike,
    sample_rate: int = SAMPLE_RATE,
    block_seconds: float = BLOCK_SECONDS,
    max_seconds: float | None = None,
) -> Iterator[np.ndarray]:
    """Decode a file as consecutive 1-D mono float32 blocks at `sample_rate`.

    At most `block_seconds` of the source are decoded at a time, then channels are averaged and
    the block goes through one soxr stream (quality 'VHQ'), so memory is bounded by the block,
    not the file, and the concatenated blocks equal a resampling of the whole signal within the
    resampler's tolerance (bit-identical when no resampling is needed). With `max_seconds` the
    stream stops once that much audio is out (the last block is cut to it). A file that fails to
    decode part-way, or yields fewer samples than its header states, is an `AudioError`.
    """
    path = Path(path)
    limit = None if max_seconds is None else round(max_seconds * sample_rate)
    emitted = 0
    with _open(path) as audio_file:
        source_rate, expected = audio_file.samplerate, audio_file.frames
        resampler = (
            soxr.ResampleStream(source_rate, sample_rate, 1, dtype="float32", quality="VHQ")
            if source_rate != sample_rate
            else None
        )
        block = max(1, round(block_seconds * source_rate))
        decoded = 0
        while decoded < expected and (limit is None or emitted < limit):
            try:
                frames = audio_file.read(min(block, expected - decoded), dtype="float32", always_2d=True)
            except sf.SoundFileError as err:
                raise AudioError(
                    f"{path}: decoding failed after {decoded / source_rate:.1f} s ({err}); the file "
                    "is corrupt: re-export it or drop it"
                ) from None
            if len(frames) == 0:
                raise AudioError(
                    f"{path}: decoded {decoded} of the {expected} samples its header states; the "
                    "file is truncated: re-export it or drop it"
                )
            decoded += len(frames)
            mono = _to_mono(frames, path)
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=decoded >= expected)
            if limit is not None:
                mono = mono[: limit - emitted]
            emitted += len(mono)
            if len(mono):
                yield mono


def load_audio(
    path: PathLike, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """A whole file (or its first `max_seconds`) as one 1-D mono float32 array at `sample_rate`:
    the blocks of `stream_audio` joined, so peak memory is the output plus one block."""
    blocks = list(stream_audio(path, sample_rate, max_seconds=max_seconds))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


def read_crop(path: PathLike, start: int, num_samples: int) -> np.ndarray:
    """Read samples [start, start + num_samples) of a 24 kHz file as 1-D mono float32.

    Only the requested frames are decoded. The file must already be at `SAMPLE_RATE` (data
    preparation resamples once) and the crop must lie inside it.
    """
    path = Path(path)
    if start < 0 or num_samples <= 0:
        raise AudioError(f"{path}: invalid crop start={start}, num_samples={num_samples}")
    with _open(path) as audio_file:
        if audio_file.samplerate != SAMPLE_RATE:
            raise AudioError(
                f"{path}: sample rate is {audio_file.samplerate} Hz, crops need {SAMPLE_RATE} Hz; "
                "run data preparation to resample it first"
            )
        if start + num_samples > audio_file.frames:
            raise AudioError(
                f"{path}: crop [{start}, {start + num_samples}) runs past the end of its "
                f"{audio_file.frames} samples; rebuild the manifest so lengths match the audio"
            )
        audio_file.seek(start)
        frames = audio_file.read(num_samples, dtype="float32", always_2d=True)
    if len(frames) != num_samples:
        raise AudioError(
            f"{path}: decoded {len(frames)} of {num_samples} samples from {start}; the header "
            "overstates the length, so re-encode the file (e.g. to FLAC) during data preparation"
        )
    return _to_mono(frames, path)
