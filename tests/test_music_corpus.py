"""Rendering music21 corpus scores through the General-MIDI soundfont into tagged 24 kHz audio."""

from collections import Counter

import numpy as np
import pytest
import soundfile as sf
from music21 import meter, note, stream

from culturemert.audio import SAMPLE_RATE, load_audio
from culturemert.music_corpus import (
    INSTRUMENTS,
    RELEASE_SECONDS,
    list_collection,
    render_collection,
    render_score,
    synthesize,
    tempo_bucket,
    tuning_cents,
)


def _held_note(name: str, quarter_lengths: float, time_signature: str = "4/4") -> stream.Part:
    part = stream.Part([meter.TimeSignature(time_signature)])
    part.append(note.Note(name, quarterLength=quarter_lengths))
    return part


def test_a_rendered_a4_sounds_at_440_hz():
    audio = synthesize(_held_note("A4", 4), program=INSTRUMENTS["flute"], bpm=60)

    spectrum = np.abs(np.fft.rfft(audio[: 2 * SAMPLE_RATE]))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / (2 * SAMPLE_RATE)
    assert round(69 + 12 * np.log2(peak_hz / 440.0)) == 69  # the nearest MIDI key is A4
    assert np.abs(audio).max() == pytest.approx(10 ** (-1 / 20), rel=1e-5)


def _peak_hz(audio: np.ndarray) -> float:
    """The strongest frequency of the first 2 s, to 0.5 Hz (a 2 s DFT), refined by the centre of
    mass of the peak's neighbours."""
    spectrum = np.abs(np.fft.rfft(audio[: 2 * SAMPLE_RATE]))
    peak = int(np.argmax(spectrum))
    near = spectrum[peak - 2 : peak + 3]
    return float((np.arange(peak - 2, peak + 3) * near).sum() / near.sum()) / 2


@pytest.mark.parametrize(("tuning", "tonic", "expected_cents"), [("shifted", 0, 50), ("neutral", 5, -50)])
def test_a_tuned_a4_sounds_off_the_equal_tempered_one_by_its_cents(tuning, tonic, expected_cents):
    """A4 is the major third of F: neutral tuning lowers it a quarter tone; shifted raises every
    pitch a quarter tone (thesis 1.1: tunings off 12-TET). Measured against the same sample
    untuned (the soundfont's samples are themselves a few cents off)."""
    cents = tuning_cents(tuning, tonic)
    assert cents[9] == expected_cents
    equal = synthesize(_held_note("A4", 4), program=INSTRUMENTS["sitar"], bpm=60)
    tuned = synthesize(_held_note("A4", 4), program=INSTRUMENTS["sitar"], bpm=60, cents=cents)
    assert 1200 * np.log2(_peak_hz(tuned) / _peak_hz(equal)) == pytest.approx(expected_cents, abs=3)


def test_transpose_moves_every_pitch_by_semitones():
    equal = synthesize(_held_note("A4", 4), program=INSTRUMENTS["piano"], bpm=60)
    up = synthesize(_held_note("A4", 4), program=INSTRUMENTS["piano"], bpm=60, transpose=3)
    assert 12 * np.log2(_peak_hz(up) / _peak_hz(equal)) == pytest.approx(3, abs=0.03)


def test_bpm_counts_beats_of_the_time_signature():
    release = round(RELEASE_SECONDS * SAMPLE_RATE)
    in_4_4 = synthesize(_held_note("C5", 6), bpm=120)
    in_6_8 = _held_note("C5", 6, time_signature="6/8")

    assert len(in_4_4) - release == 3 * SAMPLE_RATE  # six quarters at 120 quarters a minute
    assert len(synthesize(_held_note("C5", 6), bpm=60)) - release == 6 * SAMPLE_RATE
    assert len(synthesize(in_6_8, bpm=120)) - release == 2 * SAMPLE_RATE  # four dotted quarters


def test_max_seconds_cuts_the_rendering():
    assert len(synthesize(_held_note("C5", 8), bpm=60, max_seconds=1.5)) == 1.5 * SAMPLE_RATE


def test_the_instrument_changes_the_sound():
    piano = synthesize(_held_note("E4", 2), program=INSTRUMENTS["piano"])
    violin = synthesize(_held_note("E4", 2), program=INSTRUMENTS["violin"])

    assert piano.shape == violin.shape
    assert np.abs(piano - violin).max() > 0.1


def test_render_score_writes_a_24k_mono_file_atomically(tmp_path):
    out_path = render_score("bach/bwv66.6.mxl", tmp_path / "chorale.wav", max_seconds=3.0)

    info = sf.info(out_path)
    assert (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 1, 3 * SAMPLE_RATE)
    assert [path.name for path in tmp_path.iterdir()] == ["chorale.wav"]


def test_render_collection_is_tagged_audible_and_deterministic(tmp_path):
    first = render_collection("fiddle", tmp_path / "a", n=2, seed=7, max_seconds=4.0)
    again = render_collection("fiddle", tmp_path / "b", n=2, seed=7, max_seconds=4.0)

    assert [path.name for path, _ in first] == ["fiddle-0000.wav", "fiddle-0001.wav"]
    for (path, tags), (path_again, tags_again) in zip(first, again):
        assert tags == tags_again
        assert path.read_bytes() == path_again.read_bytes()
        info = sf.info(path)
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
        assert info.frames == 4 * SAMPLE_RATE
        audio = load_audio(path)
        assert np.sqrt(np.mean(audio**2)) > 0.02
        assert tags["collection"] == "fiddle" and tags["style"] == "fiddle-tune"
        assert tags["tune_type"] in {"reel", "jig", "hornpipe"}
        assert tags["instrument"] in INSTRUMENTS
        assert tags["tempo"] == tempo_bucket(int(tags["bpm"]))
        assert tags["source"].startswith("ryansMammoth/")
    assert first[0][1]["source"] != first[1][1]["source"]


def test_fiddle_tunes_are_typed_from_their_abc_rhythm_field():
    types = Counter(piece.tags["tune_type"] for piece in list_collection("fiddle"))

    assert set(types) == {"reel", "jig", "hornpipe"}
    assert min(types.values()) > 200 and sum(types.values()) > 900


def test_essen_songs_are_numbered_tunes_from_two_regions():
    pieces = list_collection("essen")
    regions = Counter(piece.tags["region"] for piece in pieces)

    assert set(regions) == {"china", "germany"} and regions["china"] > 1000
    assert all(piece.number is not None for piece in pieces)
    assert len({(piece.source, piece.number) for piece in pieces}) == len(pieces)


def test_tempo_buckets():
    assert [tempo_bucket(bpm) for bpm in (60, 89, 90, 129, 130, 160)] == [
        "slow",
        "slow",
        "medium",
        "medium",
        "fast",
        "fast",
    ]


def test_unknown_collection_lists_the_known_ones():
    with pytest.raises(ValueError, match="bach"):
        list_collection("gamelan")
