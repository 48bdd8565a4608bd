"""The EnCodec teacher and its offline token cache, on music21 scores rendered to 24 kHz audio.

The published EnCodec weights cannot be downloaded here, so the teacher is the data-initialised
one (`EncodecTeacher.from_data`): same architecture and cost, codebooks drawn from real music.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from culturemert.audio import SAMPLE_RATE, AudioError, load_audio
from culturemert.cli import run as run_cli
from culturemert.cli.extract_tokens import main as extract_tokens_main
from culturemert.compat import import_encodec
from culturemert.data.manifest import read_manifest, write_manifest
from culturemert.music_corpus import render_collection
from culturemert.targets.encodec_teacher import (
    BANDWIDTH,
    CHECKPOINT_NAME,
    CHECKPOINT_URL,
    EncodecTeacher,
    MissingWeightsError,
    TeacherError,
)
from culturemert.targets.token_cache import TokenCache, TokenCacheError, build_token_cache


def extract_tokens_cli(argv: list[str]) -> int:
    """The extract_tokens command as the entry point runs it: a user error is status 2."""
    return run_cli(extract_tokens_main, "extract_tokens", argv)


REPO = Path(__file__).resolve().parents[1]
# Cache settings of these tests: each row is a part of its own and is encoded in one teacher call
# of two chunks: frames [0, 150) and, with 1 s of context, the rest.
SETTINGS = dict(batch_seconds=6.2, chunk_seconds=2.0, progress=False)
# A fresh encoding of a crop differs from the cached codes in its first frames, where EnCodec sees
# reflection padding and a fresh LSTM state instead of the audio before the crop. Measured on these
# tunes: 25-35 % of the codes of frames 0-7 agree, 55 % of frames 8-15, 90-100 % of frames 16-23,
# and all later ones (but for a rare float32 near-tie).
BOUNDARY_FRAMES = 24


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> EncodecTeacher:
    """A data-initialised teacher calibrated on 16 s of two Bach chorales (1,200 frames)."""
    rendered = render_collection("bach", tmp_path_factory.mktemp("bach"), 2, seed=0, max_seconds=8.0)
    calibration = np.concatenate([load_audio(path) for path, _ in rendered])
    return EncodecTeacher.from_data(torch.from_numpy(calibration)[None], seed=0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Three fiddle tunes: two of 4 s and one cut to 60,100 samples (a partial last frame)."""
    folder = tmp_path_factory.mktemp("fiddle")
    rendered = render_collection("fiddle", folder, 3, seed=0, max_seconds=4.0)
    last = rendered[-1][0]
    sf.write(last, load_audio(last)[:60_100], SAMPLE_RATE, subtype="PCM_16")
    manifest_path = folder / "train.tsv"
    write_manifest(manifest_path, folder, [(path.name, sf.info(path).frames) for path, _ in rendered])
    return manifest_path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, manifest, teacher) -> Path:
    return build_token_cache(manifest, teacher, tmp_path_factory.mktemp("cache") / "tokens", **SETTINGS)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def test_cached_codes_match_a_fresh_encoding(manifest, teacher, cache_dir):
    cache = TokenCache.open(cache_dir, manifest)
    audio = torch.from_numpy(load_audio(read_manifest(manifest).audio_path(0)))[None]

    whole_row = teacher.codes(audio)[0].numpy()
    cached_row = cache.codes_for(0, 0, cache.num_frames(0))
    assert cached_row.shape == whole_row.shape == (300, 8)
    assert _agreement(cached_row, whole_row) > 0.99  # 2 s chunks + 1 s context vs one pass over 4 s
    assert _agreement(cached_row[150:180], whole_row[150:180]) > 0.95  # just after the chunk boundary

    start, length = 50, 225  # a 3 s crop starting at sample 320 * 50
    crop = teacher.codes(audio[:, 320 * start : 320 * (start + length)])[0].numpy()
    cached_crop = cache.codes_for(0, start, length)
    assert _agreement(crop[BOUNDARY_FRAMES:], cached_crop[BOUNDARY_FRAMES:]) > 0.99
    assert _agreement(crop[:8], cached_crop[:8]) < 0.5
    assert _agreement(crop[BOUNDARY_FRAMES + 1 :], cached_crop[BOUNDARY_FRAMES:-1]) < 0.5  # one frame off


def test_cache_layout(manifest, cache_dir):
    rows = read_manifest(manifest)
    codes = np.load(cache_dir / "codes.npy")
    offsets = np.load(cache_dir / "offsets.npy")
    meta = json.loads((cache_dir / "meta.json").read_text())

    assert codes.dtype == np.uint16 and codes.shape == (offsets[-1], 8) and codes.max() < 1024
    assert offsets.dtype == np.int64 and offsets[0] == 0
    assert np.diff(offsets).tolist() == [300, 300, math.ceil(60_100 / 320)]
    assert meta["rows"] == 3 and meta["total_frames"] == len(codes) and meta["skipped"] == []
    assert meta["manifest_sha256"] == rows.checksum() and meta["manifest"] == str(manifest)
    assert (meta["bandwidth"], meta["sample_rate"], meta["frame_rate"]) == (BANDWIDTH, 24000, 75)
    assert meta["teacher"]["init"] == "from_data" and meta["teacher"]["seed"] == 0
    assert not (cache_dir / ".partial").exists()

    cache = TokenCache.open(cache_dir, rows)
    assert isinstance(cache.codes, np.memmap)
    window = cache.codes_for(2, 150, 38)
    assert window.dtype == np.int64 and np.array_equal(window, codes[750:788])
    with pytest.raises(IndexError, match=r"\[150, 189\) of row 2 run past its 188"):
        cache.codes_for(2, 150, 39)


def test_a_cache_is_tied_to_its_manifest(tmp_path, manifest, teacher, cache_dir, monkeypatch):
    rows = read_manifest(manifest)
    reordered = tmp_path / "reordered.tsv"
    write_manifest(reordered, rows.root, [(rows.files[i], int(rows.num_samples[i])) for i in (1, 0, 2)])

    with pytest.raises(TokenCacheError) as opened:
        TokenCache.open(cache_dir, reordered)
    assert str(manifest) in str(opened.value) and str(reordered) in str(opened.value)
    with pytest.raises(TokenCacheError, match="delete"):
        build_token_cache(reordered, teacher, cache_dir, **SETTINGS)
    with pytest.raises(TokenCacheError, match="incomplete cache"):
        TokenCache.open(tmp_path, manifest)

    monkeypatch.setattr(teacher, "codes", lambda wav: pytest.fail("a complete cache was re-encoded"))
    build_token_cache(manifest, teacher, cache_dir, **SETTINGS)


def test_an_interrupted_build_resumes_to_identical_bytes(tmp_path, manifest, teacher, cache_dir, monkeypatch):
    out_dir = tmp_path / "tokens"
    encode = teacher.codes
    calls = []

    def crash_on_second_call(wav: torch.Tensor) -> torch.Tensor:
        calls.append(len(wav))
        if len(calls) == 2:  # the first part (row 0) is written, row 1 is under way
            raise KeyboardInterrupt
        return encode(wav)

    monkeypatch.setattr(teacher, "codes", crash_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(manifest, teacher, out_dir, **SETTINGS)
    partial = sorted(path.name for path in (out_dir / ".partial").iterdir())
    assert partial == ["part-000000.npz", "settings.json"] and not (out_dir / "meta.json").exists()
    (out_dir / ".partial" / "part-000001.npz.tmp").write_bytes(b"half-written by a killed run")

    with pytest.raises(TokenCacheError, match="batch_seconds"):
        build_token_cache(manifest, teacher, out_dir, **{**SETTINGS, "batch_seconds": 30.0})

    calls.clear()
    monkeypatch.setattr(teacher, "codes", lambda wav: calls.append(len(wav)) or encode(wav))
    build_token_cache(manifest, teacher, out_dir, **SETTINGS)
    assert len(calls) == 2  # rows 1 and 2 only
    for name in ("codes.npy", "offsets.npy", "meta.json"):
        assert (out_dir / name).read_bytes() == (cache_dir / name).read_bytes(), name
    assert not (out_dir / ".partial").exists()


def test_the_data_initialised_teacher_emits_many_codes(manifest, teacher, cache_dir):
    codes = TokenCache.open(cache_dir, manifest).codes_for(1, 0, 300)  # 4 s of a fiddle tune
    audio = torch.from_numpy(load_audio(read_manifest(manifest).audio_path(1))[:SAMPLE_RATE])[None]
    untrained = EncodecTeacher(import_encodec().EncodecModel.encodec_model_24khz(pretrained=False), {})

    distinct = [len(np.unique(codebook)) for codebook in codes.T]
    assert distinct[0] > 100 and min(distinct) > 30, distinct  # measured: 204, 176, 137, 115, 84, 88, 66, 55
    assert untrained.codes(audio).unique().tolist() == [0]  # all-zero codebooks: code 0 everywhere

    with pytest.raises(TeacherError, match="distinct frames"):  # 75 frames of calibration audio
        EncodecTeacher.from_data(audio, seed=0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, teacher) -> tuple[Path, torch.nn.Module]:
    """An EnCodec 24 kHz checkpoint in the published file's format, holding the test teacher."""
    model = import_encodec().EncodecModel.encodec_model_24khz(pretrained=False)
    model.encoder.load_state_dict(teacher.encoder.state_dict())
    model.quantizer.load_state_dict(teacher.quantizer.state_dict())
    path = tmp_path_factory.mktemp("weights") / CHECKPOINT_NAME
    torch.save(model.state_dict(), path)
    return path, model


def test_from_checkpoint_gives_encodec_codes_at_6_kbps(tmp_path, manifest, weights):
    path, model = weights
    teacher = EncodecTeacher.from_checkpoint(path)
    wav = torch.from_numpy(load_audio(read_manifest(manifest).audio_path(0))[: 2 * SAMPLE_RATE]).view(2, -1)

    model.set_target_bandwidth(BANDWIDTH)
    with torch.no_grad():
        ((expected, _),) = model.encode(wav[:, None])
    assert expected.shape == (2, 8, 75) and len(expected.unique()) > 50
    assert torch.equal(teacher.codes(wav), expected.transpose(1, 2))
    assert teacher.codes(wav[:, :-1]).shape == (2, 75, 8) and teacher.codes(wav[:, :1]).shape == (2, 1, 8)
    assert not any(parameter.requires_grad for parameter in teacher.parameters()) and not teacher.training
    assert teacher.identity["checkpoint"] == CHECKPOINT_NAME

    with pytest.raises(MissingWeightsError, match=CHECKPOINT_URL):
        EncodecTeacher.from_checkpoint(path.with_name("missing.th"))
    (tmp_path / "truncated.th").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(TeacherError, match="not the EnCodec 24 kHz checkpoint"):
        EncodecTeacher.from_checkpoint(tmp_path / "truncated.th")


def test_cli_missing_weights_exits_2_naming_the_file(tmp_path, manifest, capsys):
    missing = tmp_path / "weights" / CHECKPOINT_NAME
    arguments = ["--manifest", str(manifest), "--encodec", str(missing), "--out", str(tmp_path / "tokens")]

    assert extract_tokens_cli(arguments) == 2
    (message,) = capsys.readouterr().err.splitlines()
    assert str(missing) in message and CHECKPOINT_URL in message


def test_cli_names_bad_audio_or_skips_it(tmp_path, manifest, teacher, weights, capsys):
    rows = read_manifest(manifest)
    (tmp_path / "broken.wav").write_bytes(b"not audio at all")
    (tmp_path / rows.files[2]).symlink_to(rows.audio_path(2))
    mixed = tmp_path / "mixed.tsv"
    write_manifest(mixed, tmp_path, [("broken.wav", 24000), (rows.files[2], int(rows.num_samples[2]))])
    arguments = ["--manifest", str(mixed), "--encodec", str(weights[0]), "--out", str(tmp_path / "tokens")]
    main = extract_tokens_cli

    assert main(arguments) == 2
    assert "broken.wav" in capsys.readouterr().err
    assert main(arguments + ["--skip-bad"]) == 0
    cache = TokenCache.open(tmp_path / "tokens", mixed)
    assert cache.num_frames(0) == 0 and cache.num_frames(1) == 188
    (skipped,) = cache.meta["skipped"]
    assert skipped["file"] == "broken.wav" and "not readable" in skipped["reason"]
    with pytest.raises(AudioError, match="broken.wav"):
        build_token_cache(mixed, teacher, tmp_path / "strict", **SETTINGS)


def test_saved_data_teacher_reloads_with_identical_codes(tmp_path):
    """--save-teacher: a data-initialised teacher written as an EnCodec checkpoint and read back by
    from_checkpoint gives the same codes, so every manifest of a run can share it."""
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randn(1, 20 * 24_000, generator=generator) * 0.1
    teacher = EncodecTeacher.from_data(calibration, seed=0)
    teacher.save(tmp_path / "teacher.th")
    reloaded = EncodecTeacher.from_checkpoint(tmp_path / "teacher.th")
    wav = torch.randn(2, 48_000, generator=generator) * 0.1
    assert torch.equal(reloaded.codes(wav), teacher.codes(wav))
