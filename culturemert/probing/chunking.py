"""From a recording to the chunks the frozen model encodes (thesis 3.5.2).

1. Cut: only the first ``max_seconds`` of a recording are used (the per-dataset maximum duration
   of `tasks.MAX_SECONDS`: Makam 150 s, Hindustani 780 s, Carnatic 330 s; others uncut).
2. Normalise (an option, off by default as in pre-training; thesis 3.2): the whole cut recording
   is scaled to zero mean and unit variance, as the MERT processor does to its input
   (transformers' ``Wav2Vec2FeatureExtractor``: (x - mean) / sqrt(var + 1e-7)).
3. Chunk: non-overlapping windows of ``window_seconds`` (30 s) starting every window, MARBLE's
   sliding window at 0 % overlap. The last window holds what is left and is kept when it lasts
   at least ``min_last_seconds`` (1 s, MARBLE's rule), dropped otherwise; a recording shorter
   than that is kept whole as its only chunk. Chunks are never padded: each is encoded at its
   own length. A 95 s recording gives 4 chunks, [0, 30), [30, 60), [60, 90) and [90, 95) s; a
   90.5 s one gives 3.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from culturemert.audio import SAMPLE_RATE

WINDOW_SECONDS = 30.0
MIN_LAST_SECONDS = 1.0
NORMALIZE_EPSILON = 1e-7


def chunk_bounds(
    num_samples: int,
    sample_rate: int = SAMPLE_RATE,
    window_seconds: float = WINDOW_SECONDS,
    min_last_seconds: float = MIN_LAST_SECONDS,
) -> list[tuple[int, int]]:
    """[start, stop) sample bounds of the chunks of a recording of `num_samples` (step 3 above)."""
    if num_samples <= 0:
        raise ValueError(f"a recording of {num_samples} samples has no chunks")
    window = round(window_seconds * sample_rate)
    bounds = [(start, min(start + window, num_samples)) for start in range(0, num_samples, window)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last_seconds * sample_rate:
        bounds.pop()
    return bounds


def normalize(wav: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance, as the MERT processor normalises its input (step 2 above)."""
    wav = wav.astype(np.float32)
    return (wav - wav.mean()) / np.sqrt(wav.var() + NORMALIZE_EPSILON)


def recording_chunks(
    wav: np.ndarray,
    max_seconds: float | None,
    normalise: bool,
    sample_rate: int = SAMPLE_RATE,
    window_seconds: float = WINDOW_SECONDS,
    min_last_seconds: float = MIN_LAST_SECONDS,
) -> list[np.ndarray]:
    """The chunks of a 1-D waveform after steps 1-3 above, as float32 arrays."""
    if max_seconds is not None:
        wav = wav[: round(max_seconds * sample_rate)]
    if normalise:
        wav = normalize(wav)
    bounds = chunk_bounds(len(wav), sample_rate, window_seconds, min_last_seconds)
    return [np.ascontiguousarray(wav[start:stop], dtype=np.float32) for start, stop in bounds]


def stream_chunks(
    blocks: Iterable[np.ndarray],
    sample_rate: int = SAMPLE_RATE,
    window_seconds: float = WINDOW_SECONDS,
    min_last_seconds: float = MIN_LAST_SECONDS,
) -> Iterator[np.ndarray]:
    """The chunks of step 3 of the waveform that consecutive `blocks` make up (the chunks of
    `chunk_bounds`, equal to slicing the joined blocks), each yielded as soon as it is complete:
    only one window and one block are held at a time, however long the recording."""
    window = round(window_seconds * sample_rate)
    pending: list[np.ndarray] = []
    held = emitted = 0
    for block in blocks:
        pending.append(block)
        held += len(block)
        while held >= window:
            joined = np.concatenate(pending)
            yield np.ascontiguousarray(joined[:window], dtype=np.float32)
            pending, held, emitted = [joined[window:]], held - window, emitted + 1
    if held and (emitted == 0 or held >= min_last_seconds * sample_rate):
        yield np.ascontiguousarray(np.concatenate(pending), dtype=np.float32)
