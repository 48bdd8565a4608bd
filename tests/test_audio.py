"""Reading audio: resampling, mono mixdown, partial reads and the errors users see."""

import numpy as np
import pytest
import soundfile as sf
import soxr

from culturemert.audio import SAMPLE_RATE, AudioError, audio_info, load_audio, read_crop, stream_audio


def _sine(frequency: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def test_stereo_44k_is_mixed_down_and_resampled_to_24k(tmp_path):
    left, right = _sine(440.0, 2.0, 44100), _sine(1000.0, 2.0, 44100)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="FLOAT")

    audio = load_audio(path)

    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 2 * SAMPLE_RATE
    expected = soxr.resample((left + right) / 2, 44100, SAMPLE_RATE, quality="VHQ")
    np.testing.assert_allclose(audio, expected, atol=1e-6)
    spectrum = np.abs(np.fft.rfft(audio))
    peaks = sorted(np.argsort(spectrum)[-2:] * SAMPLE_RATE / len(audio))
    assert peaks == pytest.approx([440.0, 1000.0], abs=1.0)


def test_audio_info_reads_the_header(tmp_path):
    path = tmp_path / "tone.flac"
    sf.write(path, np.stack([_sine(220.0, 1.5, 32000)] * 3, axis=1), 32000)

    assert audio_info(path) == (48000, 32000, 3)


def test_read_crop_equals_the_slice_of_the_whole_file(tmp_path):
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, size=(SAMPLE_RATE * 3, 2)).astype(np.float32)
    path = tmp_path / "noise.wav"
    sf.write(path, stereo, SAMPLE_RATE, subtype="FLOAT")

    crop = read_crop(path, start=12345, num_samples=30000)

    assert crop.dtype == np.float32
    np.testing.assert_array_equal(crop, load_audio(path)[12345 : 12345 + 30000])
    np.testing.assert_allclose(crop, stereo[12345:42345].mean(axis=1), atol=1e-7)


def test_read_crop_may_end_exactly_at_the_last_sample(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, _sine(440.0, 1.0, SAMPLE_RATE), SAMPLE_RATE, subtype="FLOAT")

    assert len(read_crop(path, SAMPLE_RATE - 100, 100)) == 100


def test_read_crop_past_the_end_names_the_file_and_the_length(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, _sine(440.0, 1.0, SAMPLE_RATE), SAMPLE_RATE)

    with pytest.raises(AudioError, match=r"short\.wav.*past the end of its 24000 samples"):
        read_crop(path, SAMPLE_RATE - 100, 101)


def test_read_crop_refuses_audio_that_is_not_at_24k(tmp_path):
    path = tmp_path / "cd.wav"
    sf.write(path, _sine(440.0, 1.0, 44100), 44100)

    with pytest.raises(AudioError, match=r"cd\.wav.*44100 Hz.*data preparation"):
        read_crop(path, 0, 1000)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match=r"absent\.wav: no such file"):
        load_audio(tmp_path / "absent.wav")


def test_text_file_named_wav_is_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are liner notes, not audio\n" * 20)

    for read in (load_audio, audio_info, lambda p: read_crop(p, 0, 10)):
        with pytest.raises(AudioError, match=r"notes\.wav: not readable as audio"):
            read(path)


def test_zero_length_file(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros((0, 1), dtype=np.float32), SAMPLE_RATE)

    with pytest.raises(AudioError, match=r"empty\.wav: contains no samples"):
        load_audio(path)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_samples(tmp_path, bad_value):
    audio = _sine(440.0, 1.0, SAMPLE_RATE)
    audio[5000] = bad_value
    path = tmp_path / "broken.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="FLOAT")

    with pytest.raises(AudioError, match=r"broken\.wav: contains NaN or infinite"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"broken\.wav: contains NaN or infinite"):
        read_crop(path, 4000, 2000)
    assert np.isfinite(read_crop(path, 0, 4000)).all()


def test_streamed_blocks_equal_resampling_the_whole_file(tmp_path):
    rate = 44100
    stereo = np.stack([_sine(440.0, 7.3, rate), _sine(97.0, 7.3, rate)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")
    whole = soxr.resample(stereo.mean(axis=1), rate, SAMPLE_RATE, quality="VHQ")

    blocks = list(stream_audio(path, block_seconds=0.37))  # 20 blocks, none aligned to the output

    assert len(blocks) > 10 and all(block.dtype == np.float32 for block in blocks)
    np.testing.assert_allclose(np.concatenate(blocks), whole, atol=1e-5)
    cut = np.concatenate(list(stream_audio(path, block_seconds=0.37, max_seconds=2.5)))
    assert len(cut) == round(2.5 * SAMPLE_RATE)
    np.testing.assert_allclose(cut, whole[: len(cut)], atol=1e-5)


def test_a_file_corrupted_mid_way_names_the_file(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, _sine(440.0, 20.0, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still promises 20 s

    with pytest.raises(AudioError, match=r"cut\.flac: .*(truncated|corrupt)"):
        load_audio(path)
