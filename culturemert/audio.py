"""Reading audio for the project: mono float32 waveforms at MERT's 24 kHz.

soundfile decodes (WAV, FLAC, OGG, MP3; partial reads without decoding the whole file) and soxr
resamples, so torchaudio is never needed. Every failure is an `AudioError` naming the file, the
problem and the fix.
"""

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 24000

PathLike = str | os.PathLike


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file, the problem and the fix."""


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


def load_audio(path: PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a whole file to a 1-D mono float32 array at `sample_rate`.

    Channels are averaged, then the signal is resampled with soxr at its default 'VHQ' quality:
    resampling happens once per file at data preparation, where its cost is negligible next to the
    EnCodec and CQT targets, so the resampler is kept out of the list of error sources.
    """
    path = Path(path)
    with _open(path) as audio_file:
        source_rate = audio_file.samplerate
        mono = _to_mono(audio_file.read(dtype="float32", always_2d=True), path)
    if source_rate != sample_rate:
        mono = soxr.resample(mono, source_rate, sample_rate, quality="VHQ")
    return mono


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
