"""Writing the segments of a run: each recording decoded once, in blocks, and cut.

Thesis 3.1: segments are 24 kHz mono, written as 16-bit FLAC. Policies:

- Memory is bounded by the decoding block and one segment, not by the recording: the recording
  streams through `culturemert.audio.stream_audio` and each segment is written as soon as its
  samples are in.
- Resuming: a segment already written is kept only when the recording it was cut from still has
  the same content, proved by a sidecar ``<source>/<id>.source.json`` holding the sha256 of the
  recording's bytes and the segment length used. A recording whose bytes changed (replaced by
  another of the same length, say) has every selected segment re-cut. The sidecar is removed
  before a re-cut and written after it, so a kill in between never leaves it vouching for
  segments of other content.
- Full scale: float audio beyond +-1 (and resampling overshoot of full-scale audio) cannot be
  stored in 16-bit PCM. Such samples are clipped, not normalised (normalising would change a
  recording's level relative to the others), and the number clipped is logged per recording and
  recorded in the provenance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from culturemert.audio import SAMPLE_RATE, AudioError, stream_audio
from culturemert.data.budgets import Segment
from culturemert.data.sources import Recording
from culturemert.files import write_atomically, write_json_atomically
from culturemert.fingerprint import file_sha256

SEGMENT_FORMAT = ("FLAC", "PCM_16")  # soundfile format and subtype of the written segments

logger = logging.getLogger(__name__)


def sidecar(recording: Recording, audio_out: Path) -> Path:
    """The record of the content the segments of `recording` under `audio_out` were cut from."""
    return audio_out / recording.source / f"{recording.id}.source.json"


def _is_complete(path: Path, num_samples: int) -> bool:
    """Whether `path` already holds a segment of `num_samples` (written atomically, so a file
    that is there was finished)."""
    if not path.is_file():
        return False
    try:
        info = sf.info(str(path))
    except sf.SoundFileError:
        return False
    return (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 1, num_samples)


def write_segment(path: Path, audio: np.ndarray) -> int:
    """Write 16-bit mono FLAC at `path` atomically, clipping to full scale; return how many
    samples were clipped."""
    clipped = int(np.count_nonzero(np.abs(audio) > 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(
        path,
        lambda handle: sf.write(
            handle,
            np.clip(audio, -1.0, 1.0),
            SAMPLE_RATE,
            format=SEGMENT_FORMAT[0],
            subtype=SEGMENT_FORMAT[1],
        ),
    )
    return clipped


def cut_recording(recording: Recording, segments: list[Segment], audio_out: Path) -> int:
    """Decode `recording` once, block by block, and write `segments` of it under `audio_out`;
    return the samples clipped. Only the samples from the next segment's start on are kept."""
    todo = sorted(segments, key=lambda segment: segment.start)
    end = max(segment.start + segment.num_samples for segment in todo)
    buffer, offset, clipped = np.zeros(0, dtype=np.float32), 0, 0  # buffer[0] is sample `offset`
    for block in stream_audio(recording.path, max_seconds=end / SAMPLE_RATE):
        buffer = np.concatenate([buffer, block])
        while todo and todo[0].start + todo[0].num_samples <= offset + len(buffer):
            segment = todo.pop(0)
            begin = segment.start - offset
            clipped += write_segment(audio_out / segment.name, buffer[begin : begin + segment.num_samples])
        keep_from = todo[0].start if todo else offset + len(buffer)
        if keep_from > offset:
            buffer, offset = buffer[keep_from - offset :], keep_from
    if todo:
        raise AudioError(
            f"{recording.path}: its header promises {recording.num_samples} samples at 24 kHz but "
            f"{offset + len(buffer)} decode; re-encode the file (e.g. to FLAC) and run again"
        )
    return clipped


def _read_record(path: Path) -> dict | None:
    """The sidecar at `path`, or None where there is none (or an unreadable one: re-cut)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class WriteReport:
    """What `write_segments` did: the names of the segments written (the others were kept), the
    recordings re-cut because their content changed, samples clipped per recording
    (``<source>/<id>``, only where any were) and the recordings that failed to decode (skipped)."""

    written: list[str] = field(default_factory=list)
    recut: list[str] = field(default_factory=list)
    clipped: dict[str, int] = field(default_factory=dict)
    failed: list[tuple[Recording, str]] = field(default_factory=list)


def write_segments(
    segments: Iterable[Segment], audio_out: Path, segment_samples: int, skip_unreadable: bool = False
) -> WriteReport:
    """Write every segment under `audio_out`, decoding each recording once; segments already
    written from the same content (module docstring) are kept, so an interrupted run resumes. A
    recording that fails to decode is an `AudioError` naming it, or with `skip_unreadable` is
    listed in the report's ``failed`` (its segments must then leave the plan)."""
    by_recording: dict[Recording, list[Segment]] = {}
    for segment in segments:
        by_recording.setdefault(segment.recording, []).append(segment)
    report = WriteReport()
    for recording in tqdm(
        sorted(by_recording, key=lambda r: (r.source, r.id)), desc="segments", unit="recording"
    ):
        name = f"{recording.source}/{recording.id}"
        record_path = sidecar(recording, audio_out)
        record = {"sha256": file_sha256(recording.path), "segment_samples": segment_samples}
        previous = _read_record(record_path)
        chosen = by_recording[recording]
        if previous == record:
            todo = [seg for seg in chosen if not _is_complete(audio_out / seg.name, seg.num_samples)]
        else:
            todo = chosen
            if previous is not None:
                report.recut.append(name)
                record_path.unlink()
        if todo:
            try:
                clipped = cut_recording(recording, todo, audio_out)
            except AudioError as error:
                if not skip_unreadable:
                    raise
                report.failed.append((recording, str(error)))
                continue
            report.written += [segment.name for segment in todo]
            if clipped:
                report.clipped[name] = clipped
                logger.warning(
                    "%s: %d samples beyond full scale (+-1) clipped in its segments", recording.path, clipped
                )
        if previous != record:
            record_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(record_path, record)
    return report
