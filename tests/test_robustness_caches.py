"""Caches and feature extraction on bad or changed inputs, through the real commands (probe,
extract_tokens, token_similarity run in-process as their entry points run them): each refusal is
one line naming the file or value, and nothing is left that looks complete. Also the inference
path's hidden states against transformers' HubertModel and the training forward."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_config
from transformers import HubertModel

from culturemert.audio import SAMPLE_RATE
from culturemert.checkpoint import convert, load_model, save_fairseq
from culturemert.cli import probe as probe_cli_module
from culturemert.cli import run as run_cli
from culturemert.cli.extract_tokens import main as extract_tokens_main
from culturemert.cli.probe import main as probe_main
from culturemert.cli.token_similarity import main as token_similarity_main
from culturemert.data.manifest import write_manifest
from culturemert.files import writing
from culturemert.models.mert import MertModel
from culturemert.targets.encodec_teacher import EncodecTeacher
from culturemert.targets.token_cache import TokenCache, TokenCacheError

pytestmark = pytest.mark.usefixtures("one_thread")

CLIPS = 10  # two of each split, so both tags have a positive and a negative in valid and test
CLIP_SECONDS = 2.0
SPLITS = ("train", "train", "train", "valid", "test")


def probe(argv: list[str]) -> int:
    return run_cli(probe_main, "probe", argv)


def extract_tokens(argv: list[str]) -> int:
    return run_cli(extract_tokens_main, "extract_tokens", argv)


def token_similarity(argv: list[str]) -> int:
    return run_cli(token_similarity_main, "token_similarity", argv)


def one_line(capsys, tool: str) -> str:
    """The one stderr line of a refused command, which starts with ``<tool>: ``."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{tool}: ")]
    assert len(lines) == 1, lines
    return lines[0]


def tone(seed: int, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """A decaying tone with a little noise: audio the tiny models give finite, varied features."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) * np.exp(-t) + 0.01 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


@pytest.fixture
def clips(tmp_path) -> Path:
    folder = tmp_path / "audio"
    folder.mkdir()
    for index in range(CLIPS):
        sf.write(folder / f"clip{index}.wav", tone(index), SAMPLE_RATE, subtype="PCM_16")
    return folder


def task_csv(path: Path, names: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "tags"])
        for index, name in enumerate(names):
            writer.writerow([name, SPLITS[index % len(SPLITS)], "a|b" if index % 2 else "a"])
    return path


@pytest.fixture
def task(tmp_path) -> Path:
    return task_csv(tmp_path / "task.csv", [f"clip{index}.wav" for index in range(CLIPS)])


def tiny_model(path: Path, seed: int = 0, poison: str | None = None) -> Path:
    torch.manual_seed(seed)
    cfg = tiny_config()
    state = MertModel(cfg).state_dict()
    if poison is not None:
        state[poison][0] = float("nan")
    save_fairseq(path, cfg, state)
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    return tiny_model(tmp_path / "tiny.pt")


def extract_args(model: Path, task: Path, audio: Path, out: Path, *more: str) -> list[str]:
    return [
        "extract", "--model", str(model), "--task", str(task), "--audio-root", str(audio), "--out", str(out),
        "--window-seconds", "1", "--no-progress", *more,
    ]  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the inference path -----------------------------------------------------------------------


def test_inference_states_equal_transformers_hubert_and_the_training_forward(tmp_path):
    """The faster extraction path returns the hidden states of transformers' HubertModel on the
    same weights (within 1e-4) and of the training forward without masking; asking for fewer
    layers returns the same leading states."""
    model_path = tiny_model(tmp_path / "tiny.pt", seed=3)
    convert(model_path, tmp_path / "hf")
    ours = load_model(model_path)
    theirs = HubertModel.from_pretrained(tmp_path / "hf").eval()
    wav = torch.from_numpy(np.stack([tone(1), tone(2)]))
    with torch.inference_mode():
        fast = ours.hidden_states(wav)
        training_path = ours.forward(wav, mask=False)["hidden_states"]
        reference = theirs(wav, output_hidden_states=True).hidden_states
        first_two = ours.hidden_states(wav, layers=1)
    assert len(fast) == len(reference) == ours.cfg.encoder_layers + 1
    for mine, previous, hubert in zip(fast, training_path, reference):
        assert mine.shape == hubert.shape
        assert (mine - hubert).abs().max() < 1e-4
        assert (mine - previous).abs().max() < 1e-5
    assert len(first_two) == 2 and all(torch.equal(a, b) for a, b in zip(first_two, fast))


# --- features never non-finite --------------------------------------------------------------


def test_a_model_with_nan_weights_is_refused_before_any_cache_is_written(clips, task, tmp_path, capsys):
    poisoned = tiny_model(tmp_path / "diverged.pt", poison="encoder.layers.0.fc1.weight")
    out = tmp_path / "features"

    assert probe(extract_args(poisoned, task, clips, out)) == 2

    message = one_line(capsys, "probe")
    assert "NaN" in message and "encoder.layers.0.fc1.weight" in message and str(poisoned) in message
    assert not (out / "meta.json").exists() and not (out / "features.npy").exists()


def test_fit_refuses_non_finite_features(clips, task, model, tmp_path, capsys):
    cache = tmp_path / "features"
    assert probe(extract_args(model, task, clips, cache)) == 0
    assert np.isfinite(np.load(cache / "features.npy")).all()
    features = np.load(cache / "features.npy", mmap_mode="r+")
    features[0, 0, 0] = np.nan
    features.flush()
    del features

    run = tmp_path / "run"
    assert probe(["fit", "--features", str(cache), "--layer", "0", "--out", str(run), "--no-progress"]) == 2

    message = one_line(capsys, "probe")
    assert str(cache) in message and "NaN or infinite" in message
    assert not (run / "results.json").exists()


# --- feature extraction audio ------------------------------------------------------------------


def _too_short(path: Path) -> str:
    """100 samples: the conv stack needs 400 for one frame."""
    sf.write(path, tone(9)[:100], SAMPLE_RATE, format="FLAC")
    return "receptive field"


def _truncated(path: Path) -> str:
    """A FLAC file cut in half: its header states the full length, decoding fails part-way."""
    sf.write(path, tone(9), SAMPLE_RATE, format="FLAC")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "corrupt"


@pytest.mark.parametrize("damage", [_too_short, _truncated], ids=["too_short", "truncated"])
def test_unusable_audio_is_named_or_skipped_and_counted(damage, clips, model, tmp_path, capsys):
    problem = damage(clips / "bad.flac")
    names = [f"clip{index}.wav" for index in range(CLIPS)]
    task = task_csv(tmp_path / "task.csv", [*names[:2], "bad.flac", *names[2:]])
    out = tmp_path / "features"

    assert probe(extract_args(model, task, clips, out)) == 2
    message = one_line(capsys, "probe")
    assert str(clips / "bad.flac") in message and problem in message and "--skip-bad" in message
    assert not (out / "meta.json").exists() and not (out / "features.npy").exists()

    assert probe(extract_args(model, task, clips, out, "--skip-bad")) == 0
    meta = json.loads((out / "meta.json").read_text())
    (skipped,) = meta["skipped_bad_audio"]
    assert skipped["id"] == "bad" and problem in skipped["reason"]
    assert meta["ids"] == [name.removesuffix(".wav") for name in names]
    chunk_recording = np.load(out / "chunk_recording.npy")
    assert sorted(set(chunk_recording.tolist())) == list(range(CLIPS))  # every kept row has chunks


def test_a_long_recording_streamed_in_windows_equals_it_decoded_whole(clips, model, tmp_path):
    """Without DataLoader workers a recording's windows are encoded as they are decoded (memory
    bounded by the window); with one, each recording comes decoded whole. The caches are the same
    bytes, also when a 44.1 kHz file breaks 50 s in, after its first 30 s block gave 30 windows
    (they are dropped with it under --skip-bad)."""
    rate, seconds = 44_100, 70.0
    t = np.arange(round(seconds * rate)) / rate
    long = (0.3 * np.sin(2 * np.pi * 330 * t) * np.exp(-t / 20)).astype(np.float32)
    sf.write(clips / "long.flac", long, rate, format="FLAC")
    sf.write(clips / "broken.flac", long, rate, format="FLAC")
    data = (clips / "broken.flac").read_bytes()
    (clips / "broken.flac").write_bytes(data[: int(len(data) * 50 / seconds)])
    names = [f"clip{index}.wav" for index in range(CLIPS)]
    task = task_csv(tmp_path / "task.csv", [*names[:2], "long.flac", "broken.flac", *names[2:]])
    caches = {}
    for workers in ("0", "1"):
        caches[workers] = tmp_path / f"workers{workers}"
        args = extract_args(model, task, clips, caches[workers], "--skip-bad", "--workers", workers)
        assert probe(args) == 0
    arrays = ("features.npy", "chunk_recording.npy", "labels.npy")
    assert all((caches["0"] / a).read_bytes() == (caches["1"] / a).read_bytes() for a in arrays)
    meta = json.loads((caches["0"] / "meta.json").read_text())
    (skipped,) = meta["skipped_bad_audio"]
    assert skipped["id"] == "broken" and "corrupt" in skipped["reason"]
    chunk_recording = np.load(caches["0"] / "chunk_recording.npy")
    assert np.sum(chunk_recording == meta["ids"].index("long")) == 70  # 1 s windows
    assert (
        meta["skipped_bad_audio"] == json.loads((caches["1"] / "meta.json").read_text())["skipped_bad_audio"]
    )


# --- content fingerprints ----------------------------------------------------------------------


def test_a_feature_cache_is_refused_for_recut_audio_under_the_same_names(
    clips, task, model, tmp_path, capsys
):
    out = tmp_path / "features"
    assert probe(extract_args(model, task, clips, out)) == 0
    before = snapshot(out)
    sf.write(clips / "clip3.wav", tone(7), SAMPLE_RATE, subtype="PCM_16")  # same length, other audio

    assert probe(extract_args(model, task, clips, out)) == 2

    message = one_line(capsys, "probe")
    assert "clip3.wav" in message and "other audio" in message and "clip0.wav" not in message
    assert snapshot(out) == before


def test_a_token_cache_is_refused_for_recut_audio_under_the_same_names(clips, tmp_path, capsys):
    manifest = tmp_path / "train.tsv"
    write_manifest(
        manifest, clips, [(f"clip{index}.wav", round(CLIP_SECONDS * SAMPLE_RATE)) for index in range(3)]
    )
    teacher_file = tmp_path / "teacher.th"
    calibration = torch.from_numpy(np.concatenate([tone(seed) for seed in range(8)]))[None]  # 16 s
    EncodecTeacher.from_data(calibration, seed=0).save(teacher_file)
    out = tmp_path / "tokens"
    arguments = ["--manifest", str(manifest), "--encodec", str(teacher_file), "--out", str(out)]
    assert extract_tokens(arguments) == 0
    capsys.readouterr()
    before = snapshot(out)
    manifest_bytes = manifest.read_bytes()
    sf.write(clips / "clip1.wav", tone(8), SAMPLE_RATE, subtype="PCM_16")  # re-cut: same name and length
    assert manifest.read_bytes() == manifest_bytes

    assert extract_tokens(arguments) == 2

    message = one_line(capsys, "extract_tokens")
    assert "clip1.wav" in message and "other audio" in message
    assert snapshot(out) == before
    with pytest.raises(TokenCacheError, match="clip1.wav"):
        TokenCache.open(out, manifest)


def test_report_rows_are_models_by_content_not_folder_name(clips, task, tmp_path, capsys):
    """runs/a/hf and runs/b/hf (different weights, same folder name) are two rows with names that
    tell them apart: by default extract names them a/hf and b/hf; fit under one --name, the report
    adds each model's short hash."""
    for run, seed in (("a", 1), ("b", 2)):
        convert(tiny_model(tmp_path / f"{run}.pt", seed=seed), tmp_path / "runs" / run / "hf")
        features = tmp_path / "features" / run
        assert probe(extract_args(tmp_path / "runs" / run / "hf", task, clips, features)) == 0
        fit = ["fit", "--features", str(features), "--layer", "1", "--seeds", "1", "--max-epochs", "2"]
        fit += ["--lrs", "1e-3", "--no-progress"]
        assert probe([*fit, "--out", str(tmp_path / "probes" / run)]) == 0
        assert probe([*fit, "--out", str(tmp_path / "named" / run), "--name", "hf"]) == 0
    capsys.readouterr()

    assert probe(["report", str(tmp_path / "probes"), "--out", str(tmp_path / "report")]) == 0
    assert probe(["report", str(tmp_path / "named"), "--out", str(tmp_path / "named_report")]) == 0

    table = (tmp_path / "report" / "table.md").read_text()
    assert "| a/hf |" in table and "| b/hf |" in table
    hashes = {
        json.loads((tmp_path / "named" / run / "results.json").read_text())["model_sha256"][:8]
        for run in "ab"
    }
    named = (tmp_path / "named_report" / "table.md").read_text()
    assert len(hashes) == 2 and all(f"| hf ({digest}) |" in named for digest in hashes)


# --- token similarity --------------------------------------------------------------------------


def fake_token_cache(folder: Path, codes: np.ndarray, teacher: dict) -> Path:
    """A complete token cache folder of one row in the layout of culturemert.targets.token_cache."""
    folder.mkdir(parents=True)
    np.save(folder / "codes.npy", codes.astype("<u2"))
    np.save(folder / "offsets.npy", np.array([0, len(codes)], dtype=np.int64))
    meta = {
        "manifest": "unused.tsv",
        "rows": 1,
        "num_codebooks": 8,
        "codebook_size": 1024,
        "teacher": teacher,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_token_similarity_refuses_mixed_teachers_and_names_glob_inputs_by_their_run(tmp_path, capsys):
    rng = np.random.default_rng(0)
    teacher = {"kind": "encodec", "sha256": "0" * 64}
    paths = [
        fake_token_cache(
            tmp_path / "data" / name / "tokens" / "train", rng.integers(0, 1024, (300, 8)), teacher
        )
        for name in ("makam", "lyra", "carnatic")
    ]
    out = tmp_path / "similarity"

    assert token_similarity(["--caches", *map(str, paths), "--out", str(out)]) == 0

    with (out / "js_divergence.csv").open() as handle:
        assert next(csv.reader(handle)) == ["", "makam", "lyra", "carnatic"]

    other = dict(teacher, sha256="1" * 64)
    shutil.rmtree(paths[2])
    fake_token_cache(paths[2], rng.integers(0, 1024, (300, 8)), other)
    before = snapshot(out)
    assert token_similarity(["--caches", *map(str, paths), "--out", str(out)]) == 2
    message = one_line(capsys, "token_similarity")
    assert "different teachers" in message and str(paths[2]) in message
    assert snapshot(out) == before


# --- option values, outputs, damaged and unfinished caches ---------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("--window-seconds", "-30"),
        ("--window-seconds", "0"),
        ("--window-seconds", "0.01"),  # 240 samples: the conv stack needs 400 for one frame
        ("--window-seconds", "nan"),
        ("--max-seconds", "-5"),
        ("--workers", "-1"),
        ("--top-k", "-1"),
        ("--batch-size", "0"),
    ],
)
def test_extract_refuses_a_bad_option_value_in_one_line_and_writes_nothing(
    option, value, clips, task, model, tmp_path, capsys
):
    out = tmp_path / "features"

    assert probe(extract_args(model, task, clips, out, option, value)) == 2

    message = one_line(capsys, "probe")
    assert message.startswith(f"probe: {option} {value}:")
    assert not out.exists()


def test_fit_refuses_bad_option_values_and_a_file_as_out_before_training(
    clips, task, model, tmp_path, capsys, monkeypatch
):
    cache = tmp_path / "features"
    assert probe(extract_args(model, task, clips, cache)) == 0
    capsys.readouterr()
    monkeypatch.setattr(probe_cli_module, "fit_probe", lambda *args: pytest.fail("trained probes"))
    run = tmp_path / "run"
    fit = ["fit", "--features", str(cache), "--layer", "0", "--no-progress"]
    for option, value in (("--max-epochs", "0"), ("--batch-size", "0"), ("--lrs", "-1"), ("--seeds", "0")):
        assert probe([*fit, "--out", str(run), option, value]) == 2
        assert one_line(capsys, "probe").startswith(f"probe: {option} {value}:")
    assert not run.exists()

    taken = tmp_path / "taken.txt"
    taken.write_text("a file")
    for out, where in ((taken, "is a file"), (taken / "run", f"lies under the file {taken}")):
        assert probe([*fit, "--out", str(out)]) == 2
        message = one_line(capsys, "probe")
        assert f"--out {out} {where}" in message


def test_extract_refuses_a_file_as_out_in_one_line(clips, task, model, tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_text("a file")
    for out, where in ((taken, "is a file"), (taken / "features", f"lies under the file {taken}")):
        assert probe(extract_args(model, task, clips, out)) == 2
        assert f"--out {out} {where}" in one_line(capsys, "probe")
    assert taken.read_text() == "a file"


def test_a_second_extract_into_the_same_out_is_refused_at_once(clips, task, model, tmp_path, capsys):
    out = tmp_path / "features"
    with writing(out):  # a first extraction still running
        assert probe(extract_args(model, task, clips, out)) == 2
        message = one_line(capsys, "probe")
        assert str(out) in message and "in use" in message
        assert not out.exists()
    assert probe(extract_args(model, task, clips, out)) == 0
    assert not any(path.name.endswith(".lock") for path in tmp_path.iterdir())


def _truncate_features(cache: Path) -> str:
    (cache / "features.npy").write_bytes((cache / "features.npy").read_bytes()[:500])
    return "features.npy"


def _remove_labels(cache: Path) -> str:
    (cache / "labels.npy").unlink()
    return "labels.npy"


@pytest.mark.parametrize("damage", [_truncate_features, _remove_labels], ids=["truncated", "missing"])
def test_a_damaged_complete_cache_is_one_line_in_fit_and_extract(
    damage, clips, task, model, tmp_path, capsys
):
    cache = tmp_path / "features"
    assert probe(extract_args(model, task, clips, cache)) == 0
    array = damage(cache)
    capsys.readouterr()

    fit = ["fit", "--features", str(cache), "--layer", "0", "--out", str(tmp_path / "run"), "--no-progress"]
    for argv in (fit, extract_args(model, task, clips, cache)):
        assert probe(argv) == 2
        message = one_line(capsys, "probe")
        assert str(cache) in message and array in message and "delete the folder and re-extract" in message
    assert not (tmp_path / "run").exists()


def test_a_first_extract_that_wrote_no_part_restarts_with_repaired_audio_and_other_settings(
    clips, model, tmp_path, capsys
):
    _truncated(clips / "bad.flac")
    names = [*(f"clip{index}.wav" for index in range(CLIPS)), "bad.flac"]
    task = task_csv(tmp_path / "task.csv", names)
    out = tmp_path / "features"
    assert probe(extract_args(model, task, clips, out, "--normalize")) == 2
    assert "bad.flac" in one_line(capsys, "probe")
    assert (out / ".partial").is_dir() and not list((out / ".partial").glob("part-*"))

    sf.write(clips / "bad.flac", tone(9), SAMPLE_RATE, format="FLAC")  # repaired
    assert probe(extract_args(model, task, clips, out)) == 0  # without --normalize

    meta = json.loads((out / "meta.json").read_text())
    assert meta["normalize"] is False and len(meta["ids"]) == CLIPS + 1


def test_a_task_file_with_a_byte_order_mark_is_read(clips, model, tmp_path):
    plain = task_csv(tmp_path / "task.csv", [f"clip{index}.wav" for index in range(CLIPS)])
    marked = tmp_path / "excel" / "task.csv"
    marked.parent.mkdir()
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))

    assert probe(extract_args(model, marked, clips, tmp_path / "features")) == 0

    meta = json.loads((tmp_path / "features" / "meta.json").read_text())
    assert meta["ids"] == [f"clip{index}" for index in range(CLIPS)] and meta["tags"] == ["a", "b"]
