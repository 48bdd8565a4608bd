"""Real music that installs offline: music21 corpus scores synthesised through a General-MIDI font.

The scores come from the music21 corpus (PyPI `music21`), the soundfont is TimGM6mb.sf2 (shipped
inside the `pretty-midi` package) and `tinysoundfont` synthesises it into a numpy buffer without an
audio device. A piece can be transposed, played on other timbres and tuned off 12-tone equal
temperament (neutral thirds and sevenths as in Arabic and Turkish makam, or a quarter tone off
the Western concert pitch), the ways in which the thesis's cultures differ from Western music
(thesis 1.1, 3.1). Pieces are tagged (style, tune type or region, key, tuning, tempo,
instrument), so a probe can be trained on what the rendered audio really contains.
"""

import os
import random
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf
import tinysoundfont
from music21 import common, corpus, meter, stream

from culturemert.audio import SAMPLE_RATE
from culturemert.files import write_atomically

SOUNDFONT = resources.files("pretty_midi") / "TimGM6mb.sf2"

# General-MIDI programs (0-based) that a piece can be played on; one is drawn per piece from a
# domain's list, by default the Western four.
INSTRUMENTS = {
    "piano": 0,
    "organ": 19,
    "violin": 40,
    "flute": 73,
    "sitar": 104,
    "shamisen": 106,
    "koto": 107,
    "shanai": 111,
}
WESTERN_INSTRUMENTS = ("piano", "organ", "violin", "flute")

# Tunings: cents off 12-TET per interval in semitones above the piece's tonic.
TUNINGS = {
    "equal": {},
    "neutral": {3: 50, 4: -50, 10: 50, 11: -50},  # thirds and sevenths between minor and major
    "shifted": dict.fromkeys(range(12), 50),  # every pitch a quarter tone above concert pitch
}
TRANSPOSITIONS = range(-5, 7)  # semitones a transposed piece is moved by, drawn uniformly
PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

# Beats per minute are drawn uniformly from this range (the beat of the score's first time
# signature), independently of the collection, so tempo is a balanced label of its own.
BPM_RANGE = (60, 160)
TEMPO_BUCKETS = ((130, "fast"), (90, "medium"), (0, "slow"))  # (lowest bpm, name)

MELODIC_CHANNELS = [channel for channel in range(16) if channel != 9]  # MIDI channel 10 is drums
VELOCITY = 90
RELEASE_SECONDS = 0.5  # rendered after the last note-off so the final note decays
PEAK = 10 ** (-1 / 20)  # output peak, -1 dBFS

ESSEN_REGIONS = {
    "china": ("han1", "han2"),
    "germany": (
        "altdeu10",
        "altdeu20",
        "boehme10",
        "boehme20",
        "dva0",
        "erk5",
        "erk10",
        "erk20",
        "erk30",
        "fink0",
        "kinder0",
        "zuccal0",
    ),
}
FIDDLE_TUNE_TYPES = ("reel", "jig", "hornpipe")


@dataclass(frozen=True)
class Piece:
    """One score: its music21 corpus path, its ABC tune number (X:) in a multi-tune file or None,
    and the tags that describe it."""

    source: str
    number: int | None
    tags: dict[str, str]

    def parse(self) -> stream.Score:
        """Parse the score from the music21 corpus."""
        return corpus.parse(self.source, number=self.number)


def _note_events(
    score: stream.Stream, seconds_per_quarter: float, sample_rate: int, transpose: int, by_pitch_class: bool
) -> list[tuple[int, bool, int, int]]:
    """(sample, is_note_on, channel, key) of every sounding pitch moved by `transpose` semitones,
    sorted by time with note-offs first. Each part plays on its own channel so that unisons
    between parts do not cut each other, or, `by_pitch_class`, each pitch class on its own
    channel so that each can be tuned (unisons between parts then share one voice)."""
    parts = list(score.parts) if isinstance(score, stream.Score) else [score]
    samples_per_quarter = seconds_per_quarter * sample_rate
    events = []
    for index, part in enumerate(parts):
        for note in part.stripTies().flatten().notes:
            if note.quarterLength == 0:  # grace notes have no duration of their own
                continue
            onset = round(float(note.offset) * samples_per_quarter)
            offset = round(float(note.offset + note.quarterLength) * samples_per_quarter)
            for pitch in note.pitches:
                key = pitch.midi + transpose
                channel = MELODIC_CHANNELS[key % 12 if by_pitch_class else index % len(MELODIC_CHANNELS)]
                events.append((onset, True, channel, key))
                events.append((offset, False, channel, key))
    return sorted(events)


def synthesize(
    score: stream.Stream,
    program: int = 0,
    bpm: float = 100.0,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    transpose: int = 0,
    cents: Sequence[float] | None = None,
) -> np.ndarray:
    """Render every part of `score` on General-MIDI `program` as mono float32 peaking at -1 dBFS.

    `bpm` counts the beat of the score's first time signature (a dotted quarter in 6/8, a half
    note in 2/2). Every pitch is moved by `transpose` semitones, and pitch class c (0 = C) sounds
    `cents[c]` cents off 12-TET when `cents` is given. Rendering stops at `max_seconds`.
    """
    time_signature = score.recurse().getElementsByClass(meter.TimeSignature).first()
    beat = 1.0 if time_signature is None else float(time_signature.beatDuration.quarterLength)
    events = _note_events(score, 60.0 / (bpm * beat), sample_rate, transpose, cents is not None)
    if not events:
        raise ValueError("the score has no notes to render")
    num_samples = events[-1][0] + round(RELEASE_SECONDS * sample_rate)
    if max_seconds is not None:
        num_samples = min(num_samples, round(max_seconds * sample_rate))

    synth = tinysoundfont.Synth(samplerate=sample_rate)
    soundfont = synth.sfload(SOUNDFONT.read_bytes())
    for channel in MELODIC_CHANNELS:
        synth.program_select(channel, soundfont, 0, program)
    for pitch_class, offset in enumerate(cents or ()):
        synth.set_tuning(MELODIC_CHANNELS[pitch_class], offset / 100)
    stereo = np.zeros((num_samples, 2), dtype=np.float32)
    cursor = 0
    for sample, is_note_on, channel, key in events:
        if sample >= num_samples:
            break
        if sample > cursor:
            synth.generate_simple(sample - cursor, buffer=memoryview(stereo[cursor:sample]))
            cursor = sample
        if is_note_on:
            synth.noteon(channel, key, VELOCITY)
        else:
            synth.noteoff(channel, key)
    if cursor < num_samples:
        synth.generate_simple(num_samples - cursor, buffer=memoryview(stereo[cursor:]))

    mono = stereo.mean(axis=1)
    peak = np.abs(mono).max()
    if peak == 0:
        raise ValueError(f"the score rendered silent on General-MIDI program {program}")
    return mono * np.float32(PEAK / peak)


def render_score(
    score: stream.Stream | str,
    out_path: str | os.PathLike,
    program: int = 0,
    bpm: float = 100.0,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    transpose: int = 0,
    cents: Sequence[float] | None = None,
) -> Path:
    """Render `score` (a music21 stream, or a corpus path such as "bach/bwv66.6.mxl") with
    `synthesize` and write it atomically as a mono 16-bit WAV at `out_path`."""
    if isinstance(score, str):
        score = corpus.parse(score)
    audio = synthesize(score, program, bpm, sample_rate, max_seconds, transpose, cents)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(
        out_path, lambda handle: sf.write(handle, audio, sample_rate, format="WAV", subtype="PCM_16")
    )
    return out_path


def _corpus_dir() -> Path:
    return Path(common.getCorpusFilePath())


def _bach_pieces() -> list[Piece]:
    # bwv846 is the first prelude and fugue of the Well-Tempered Clavier; the rest are chorales.
    paths = sorted((_corpus_dir() / "bach").glob("*.mxl"))
    return [
        Piece(f"bach/{path.name}", None, {"style": "baroque-chorale"})
        for path in paths
        if path.name != "bwv846.mxl"
    ]


def _palestrina_pieces() -> list[Piece]:
    paths = sorted((_corpus_dir() / "palestrina").glob("*.krn"))
    return [Piece(f"palestrina/{path.name}", None, {"style": "renaissance-mass"}) for path in paths]


def _fiddle_pieces() -> list[Piece]:
    """Ryan's Mammoth Collection (1883), one tune per file, typed by its ABC rhythm field (R:)."""
    pieces = []
    for path in sorted((_corpus_dir() / "ryansMammoth").glob("*.abc")):
        rhythm = re.search(rb"^R:(.*)$", path.read_bytes(), re.MULTILINE)
        tune_type = rhythm[1].decode("ascii", "replace").strip().lower() if rhythm else ""
        if tune_type in FIDDLE_TUNE_TYPES:
            tags = {"style": "fiddle-tune", "tune_type": tune_type}
            pieces.append(Piece(f"ryansMammoth/{path.name}", None, tags))
    return pieces


def _essen_pieces() -> list[Piece]:
    """Essen folk songs from the Chinese (Han) and German files, one piece per ABC tune number."""
    pieces = []
    for region, stems in ESSEN_REGIONS.items():
        for stem in stems:
            text = (_corpus_dir() / "essenFolksong" / f"{stem}.abc").read_bytes()
            for number in re.findall(rb"^X:\s*(\d+)", text, re.MULTILINE):
                tags = {"style": "folk-song", "region": region}
                pieces.append(Piece(f"essenFolksong/{stem}.abc", int(number), tags))
    return pieces


COLLECTIONS: dict[str, Callable[[], list[Piece]]] = {
    "bach": _bach_pieces,
    "palestrina": _palestrina_pieces,
    "fiddle": _fiddle_pieces,
    "essen": _essen_pieces,
}


def list_collection(name: str) -> list[Piece]:
    """All pieces of a named collection (see `COLLECTIONS`), in a fixed order."""
    if name not in COLLECTIONS:
        raise ValueError(f"unknown collection {name!r}; choose one of {sorted(COLLECTIONS)}")
    return COLLECTIONS[name]()


def tempo_bucket(bpm: float) -> str:
    """Name the tempo of `bpm` beats per minute: slow, medium or fast."""
    return next(name for lowest, name in TEMPO_BUCKETS if bpm >= lowest)


def tuning_cents(tuning: str, tonic: int) -> list[float]:
    """Cents off 12-TET of each pitch class (0 = C) in `tuning` (see `TUNINGS`) on `tonic`."""
    if tuning not in TUNINGS:
        raise ValueError(f"unknown tuning {tuning!r}; choose one of {sorted(TUNINGS)}")
    return [float(TUNINGS[tuning].get((pitch_class - tonic) % 12, 0)) for pitch_class in range(12)]


@dataclass(frozen=True)
class Performance:
    """How one piece is played: instrument, tempo, tuning and transposition in semitones."""

    piece: Piece
    instrument: str
    bpm: int
    tuning: str = "equal"
    transpose: int = 0


def perform(
    performance: Performance, out_path: str | os.PathLike, max_seconds: float | None
) -> tuple[Path, dict[str, str]]:
    """Render `performance` to `out_path`; returns the file and its tags: style, tune_type or
    region where the collection has one, key (the tonic after transposition, by music21's
    Krumhansl-Schmuckler analysis of the score) and mode, tuning, instrument, bpm, tempo bucket
    and corpus source."""
    piece = performance.piece
    score = piece.parse()
    key = score.analyze("key")
    tonic = (key.tonic.pitchClass + performance.transpose) % 12
    cents = None if performance.tuning == "equal" else tuning_cents(performance.tuning, tonic)
    program = INSTRUMENTS[performance.instrument]
    out_path = render_score(
        score,
        out_path,
        program,
        performance.bpm,
        max_seconds=max_seconds,
        transpose=performance.transpose,
        cents=cents,
    )
    source = piece.source if piece.number is None else f"{piece.source}#{piece.number}"
    tags = {
        **piece.tags,
        "key": PITCH_CLASSES[tonic],
        "mode": key.mode,
        "tuning": performance.tuning,
        "instrument": performance.instrument,
        "bpm": str(performance.bpm),
        "tempo": tempo_bucket(performance.bpm),
        "source": source,
    }
    return out_path, tags


def render_collection(
    name: str,
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    max_seconds: float | None = 30.0,
    instruments: Sequence[str] = WESTERN_INSTRUMENTS,
    tunings: Sequence[str] = ("equal",),
    transpose: bool = False,
    workers: int = 1,
) -> list[tuple[Path, dict[str, str]]]:
    """Render `n` pieces drawn from collection `name` into `out_dir` as `{name}-{index:04d}.wav`,
    on `workers` processes; returns each file with its tags (`perform`, plus the collection).

    Each piece's instrument (from `instruments`), tuning (from `tunings`), tempo and, with
    `transpose`, transposition (`TRANSPOSITIONS`) are drawn from `seed`, so the same arguments
    give bit-identical files (and the defaults the files of the Western-only renderer before).
    """
    pieces = list_collection(name)
    if not 0 < n <= len(pieces):
        raise ValueError(f"n={n}: collection {name!r} has {len(pieces)} pieces")
    unknown = sorted(set(instruments) - set(INSTRUMENTS)) + sorted(set(tunings) - set(TUNINGS))
    if unknown or not instruments or not tunings:
        raise ValueError(
            f"unknown instruments or tunings {unknown}; "
            f"choose from {sorted(INSTRUMENTS)} and {sorted(TUNINGS)}"
        )
    rng = random.Random(f"{name}/{seed}")
    performances = [
        Performance(
            piece,
            rng.choice(list(instruments)),
            rng.randint(*BPM_RANGE),
            rng.choice(list(tunings)) if len(tunings) > 1 else tunings[0],  # one: no draw
            rng.choice(TRANSPOSITIONS) if transpose else 0,
        )
        for piece in rng.sample(pieces, n)
    ]
    paths = [Path(out_dir) / f"{name}-{index:04d}.wav" for index in range(n)]
    arguments = (performances, paths, [max_seconds] * n)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rendered = list(pool.map(perform, *arguments, chunksize=8))
    else:
        rendered = list(map(perform, *arguments))
    return [(path, {"collection": name, **tags}) for path, tags in rendered]
