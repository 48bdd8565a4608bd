"""Probing (scripts/probe.py, culturemert.probing): task loaders on the published splits, the chunk
rule, resumable feature extraction, the MLP probe and its metrics, and the report.

The end-to-end probe runs on real music rendered offline (music21 scores) tagged with its
collection and General-MIDI instrument, encoded by a randomly initialised tiny MERT.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from culturemert.audio import SAMPLE_RATE
from culturemert.checkpoint import save_fairseq
from culturemert.cli import run as run_cli
from culturemert.cli.probe import main as probe_main
from culturemert.data.splits import DEFAULT_SPLITS_ROOT
from culturemert.models.mert import MertConfig, MertModel
from culturemert.music_corpus import render_collection
from culturemert.probing import features as features_module
from culturemert.probing.chunking import chunk_bounds, normalize, recording_chunks, stream_chunks
from culturemert.probing.feature_cache import FeatureCache, FeatureCacheError
from culturemert.probing.features import extract_features
from culturemert.probing.metrics import evaluable_tags, macro_roc_auc, tagging_metrics
from culturemert.probing.probe import ProbeConfig, fit_probe
from culturemert.probing.report import lambda_of, markdown_tables, write_report
from culturemert.probing.tasks import (
    LYRA_VALID_FRACTION,
    TaskError,
    find_audio,
    load_csv_task,
    load_task,
    top_tags,
)


def probe_cli(argv: list[str]) -> int:
    """The probe command as the entry point runs it: a user error is status 2."""
    return run_cli(probe_main, "probe", argv)


REPO = Path(__file__).resolve().parents[1]
SPLITS = DEFAULT_SPLITS_ROOT  # the published splits, shipped with the package
COLLECTIONS = ("bach", "fiddle", "essen")
PIECES = 20  # per collection
SECONDS = 5.0
WINDOW = 2.0  # short windows so each recording has several chunks: 5 s -> [0, 2), [2, 4), [4, 5)
SPLIT_CYCLE = ("train", "train", "train", "valid", "test")

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_csv(path: Path, rows: list[tuple[str, str, list[str]]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "tags"])
        writer.writerows((name, split, "|".join(tags)) for name, split, tags in rows)
    return path


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> tuple[Path, Path, Path]:
    """60 rendered pieces of 5 s (bach, fiddle, essen), tagged collection + instrument, split
    3:1:1 within each collection; a CSV task file; a random tiny MERT (configs/model/tiny.yaml)."""
    folder = tmp_path_factory.mktemp("tagged")
    audio = folder / "audio"
    rows = []
    for name in COLLECTIONS:
        rendered = render_collection(name, audio, PIECES, seed=0, max_seconds=SECONDS)
        for index, (path, tags) in enumerate(rendered):
            rows.append(
                (path.name, SPLIT_CYCLE[index % len(SPLIT_CYCLE)], [tags["collection"], tags["instrument"]])
            )
    task_file = _write_csv(folder / "rendered.csv", rows)
    torch.manual_seed(0)
    cfg = MertConfig(**yaml.safe_load((REPO / "configs" / "model" / "tiny.yaml").read_text()))
    save_fairseq(folder / "tiny.pt", cfg, MertModel(cfg).state_dict())
    return audio, task_file, folder / "tiny.pt"


@pytest.fixture(scope="module")
def cache(tagged, tmp_path_factory) -> Path:
    audio, task_file, model = tagged
    out = tmp_path_factory.mktemp("features") / "cache"
    args = ["extract", "--model", str(model), "--task", str(task_file), "--audio-root", str(audio)]
    args += ["--out", str(out), "--window-seconds", str(WINDOW), "--name", "tiny", "--no-progress"]
    assert probe_cli(args) == 0
    return out


# --- chunking ---------------------------------------------------------------------------------


def test_a_95_s_track_gives_three_30_s_chunks_and_a_5_s_tail():
    second = SAMPLE_RATE
    assert chunk_bounds(95 * second) == [
        (0, 30 * second),
        (30 * second, 60 * second),
        (60 * second, 90 * second),
        (90 * second, 95 * second),
    ]
    assert chunk_bounds(int(90.5 * second)) == [
        (0, 30 * second),
        (30 * second, 60 * second),
        (60 * second, 90 * second),
    ]  # a 0.5 s tail is dropped
    assert chunk_bounds(int(0.5 * second)) == [(0, int(0.5 * second))]  # a short track is one chunk


@pytest.mark.parametrize("block", [7, 100, 250, 1000])
def test_chunks_streamed_from_blocks_are_the_chunks_of_the_whole_recording(block):
    """A window of 100 samples and a last chunk kept from 20: every length around the edges,
    decoded in blocks smaller, equal to and larger than the window."""
    rate, window, min_last = 100, 1.0, 0.2
    for length in (1, 19, 20, 99, 100, 101, 119, 120, 200, 219, 220, 950):
        wav = np.random.default_rng(length).standard_normal(length).astype(np.float32)
        blocks = [wav[start : start + block] for start in range(0, length, block)]
        streamed = list(stream_chunks(blocks, rate, window, min_last))
        expected = [wav[start:stop] for start, stop in chunk_bounds(length, rate, window, min_last)]
        assert [len(c) for c in streamed] == [len(c) for c in expected], length
        assert all(np.array_equal(a, b) for a, b in zip(streamed, expected))
    assert list(stream_chunks([], rate, window, min_last)) == []


def test_duration_cut_and_normalisation_come_before_chunking():
    rate = 100  # a low rate keeps the arrays small; the rule is in seconds
    wav = np.random.default_rng(0).normal(3.0, 2.0, 400 * rate).astype(np.float32)
    chunks = recording_chunks(wav, max_seconds=150.0, normalise=True, sample_rate=rate)
    assert [len(chunk) for chunk in chunks] == [30 * rate] * 5
    joined = np.concatenate(chunks)
    assert abs(joined.mean()) < 1e-5 and abs(joined.std() - 1) < 1e-4  # normalised over the cut track
    np.testing.assert_allclose(joined, normalize(wav[: 150 * rate]))


def test_normalisation_matches_the_mert_processor():
    from transformers import Wav2Vec2FeatureExtractor

    wav = np.random.default_rng(1).normal(0.1, 0.3, 24_000).astype(np.float32)
    expected = Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm([wav], [np.ones(len(wav), dtype=np.int32)])[0]
    np.testing.assert_allclose(normalize(wav), expected, atol=1e-6)


# --- tasks ------------------------------------------------------------------------------------


def test_lyra_and_fma_load_from_the_published_splits_with_top_k_training_tags():
    lyra = load_task("lyra", SPLITS)
    counts = {split: len(lyra.rows(split)) for split in ("train", "valid", "test")}
    assert counts == {"train": 1240 - 124, "valid": 124, "test": 330}
    assert round(LYRA_VALID_FRACTION * 1240) == 124
    assert len(lyra.tags) == 30 and {tag.split(":")[0] for tag in lyra.tags} == {
        "instrument",
        "genre",
        "place",
    }
    assert lyra.checksum() == load_task("lyra", SPLITS).checksum()  # the carved valid split is fixed
    fma = load_task("fma", SPLITS)
    assert len(fma.tags) == 20 and fma.labels.shape == (17486 + 2498 + 4996, 20)
    train = fma.rows("train")
    counts = fma.labels[train].sum(axis=0)
    assert list(counts) == sorted(counts, reverse=True)  # ranked by training frequency
    assert fma.max_seconds is None


def test_compmusic_and_magnatagatune_take_user_metadata(tmp_path):
    with pytest.raises(TaskError, match="--metadata"):
        load_task("makam", SPLITS)
    ids = [str(i) for i in np.load(SPLITS / "makam" / "train.npy", allow_pickle=True)]
    ids += [
        str(i) for s in ("valid", "test") for i in np.load(SPLITS / "makam" / f"{s}.npy", allow_pickle=True)
    ]
    rng = np.random.default_rng(0)
    metadata = {recording: [f"makam-{rng.integers(40)}", f"usul-{rng.integers(10)}"] for recording in ids}
    np.save(tmp_path / "metadata.npy", metadata, allow_pickle=True)
    makam = load_task("makam", SPLITS, tmp_path / "metadata.npy", trust_pickle=True)
    assert len(makam.tags) == 30 and makam.max_seconds == 150.0 and len(makam) == len(ids)
    del metadata[ids[-1]]
    np.save(tmp_path / "partial.npy", metadata, allow_pickle=True)
    with pytest.raises(TaskError, match=ids[-1]):
        load_task("makam", SPLITS, tmp_path / "partial.npy", trust_pickle=True)

    with pytest.raises(TaskError, match="binary.npy"):
        load_task("magnatagatune", SPLITS)
    valid = np.load(SPLITS / "magnatagatune" / "valid.npy", allow_pickle=True)
    test = np.load(SPLITS / "magnatagatune" / "test.npy", allow_pickle=True)
    rows = int(max(int(str(row).split("\t")[0]) for row in [*valid, *test])) + 3
    np.save(tmp_path / "train.npy", np.array([f"{rows - 2}\ta/x-1.mp3", f"{rows - 1}\tb/y-2.mp3"]))
    np.save(tmp_path / "binary.npy", rng.integers(0, 2, (rows, 50)))
    mtat = load_task("magnatagatune", SPLITS, tmp_path)
    assert len(mtat.rows("train")) == 2 and len(mtat.rows("test")) == len(test) and len(mtat.tags) == 50
    assert mtat.paths[0] == "a/x-1.mp3" and mtat.ids[0] == "x-1"


def test_top_tags_count_each_recording_once_and_break_ties_by_name():
    assert top_tags([["b", "a", "a"], ["a"], ["c", "b"]], 2) == ["a", "b"]


def test_a_task_with_an_id_missing_from_the_audio_root_is_refused_by_name(tagged, tmp_path, capsys):
    audio, _, model = tagged
    task_file = _write_csv(
        tmp_path / "holey.csv",
        [
            ("bach-0000.wav", "train", ["a"]),
            ("ghost-0001.wav", "valid", ["a"]),
            ("essen-0000.wav", "test", ["b"]),
        ],
    )
    with pytest.raises(TaskError, match="ghost-0001"):
        find_audio(load_csv_task(task_file), audio)
    args = ["extract", "--model", str(model), "--task", str(task_file), "--audio-root", str(audio)]
    assert probe_cli([*args, "--out", str(tmp_path / "cache")]) == 2
    error = capsys.readouterr().err
    assert "holey" in error and "ghost-0001" in error and str(audio) in error and "Traceback" not in error
    assert not (tmp_path / "cache").exists()

    args += ["--out", str(tmp_path / "cache"), "--skip-missing", "--no-progress"]
    assert probe_cli(args) == 0
    meta = FeatureCache.open(tmp_path / "cache").meta
    assert meta["ids"] == ["bach-0000", "essen-0000"] and meta["skipped_missing_audio"] == ["ghost-0001"]


# --- features ---------------------------------------------------------------------------------


def test_the_cache_holds_every_layer_of_every_chunk_with_its_recording(cache, tagged):
    audio, task_file, _ = tagged
    opened = FeatureCache.open(cache)
    task = load_csv_task(task_file)
    assert opened.features.dtype == np.float16 and opened.features.shape[1:] == (3, 128)  # 2 layers + input
    expected = [
        row
        for row, recording in enumerate(task.ids)
        for _ in chunk_bounds(sf.info(audio / f"{recording}.wav").frames, window_seconds=WINDOW)
    ]
    assert opened.chunk_recording.tolist() == expected
    assert opened.ids == task.ids and opened.splits == task.splits and opened.tags == task.tags
    assert np.array_equal(opened.labels, task.labels)
    assert opened.meta["normalize"] is False and opened.meta["model"] == "tiny"
    assert opened.meta["window_seconds"] == WINDOW and len(opened.meta["model_sha256"]) == 64


def test_extraction_resumes_after_a_crash_and_matches_an_uninterrupted_run(tagged, tmp_path, monkeypatch):
    audio, task_file, model = tagged
    task = load_csv_task(task_file).select(range(0, 60, 5))  # 12 recordings, 3 parts of 4
    files = find_audio(task, audio)
    settings = dict(window_seconds=WINDOW, part_recordings=4, batch_size=2, progress=False)
    whole = extract_features(task, files, model, tmp_path / "whole", **settings)

    real_encode = features_module.encode_chunks
    first_part = tmp_path / "resumed" / ".partial" / "part-000000.npz"

    def crash_once_the_first_part_is_written(*args):
        if first_part.is_file():
            raise KeyboardInterrupt
        return real_encode(*args)

    monkeypatch.setattr(features_module, "encode_chunks", crash_once_the_first_part_is_written)
    with pytest.raises(KeyboardInterrupt):
        extract_features(task, files, model, tmp_path / "resumed", **settings)
    assert sorted(p.name for p in (tmp_path / "resumed" / ".partial").glob("part-*")) == ["part-000000.npz"]
    with pytest.raises(FeatureCacheError, match="normalize"):
        extract_features(task, files, model, tmp_path / "resumed", normalize=True, **settings)
    monkeypatch.setattr(features_module, "encode_chunks", real_encode)
    resumed = extract_features(task, files, model, tmp_path / "resumed", **settings)
    assert not (resumed / ".partial").exists()
    for name in ("features.npy", "chunk_recording.npy", "labels.npy"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes()


def test_the_precision_is_part_of_the_cache_and_16_bits_need_cuda(cache, tagged, tmp_path, capsys):
    """A cache records its precision; bfloat16 on the CPU is refused before any work, and a cache
    made in another precision (a bfloat16 cache copied from a GPU machine) is not reused."""
    audio, task_file, model = tagged
    assert FeatureCache.open(cache).meta["precision"] == "float32"
    args = ["extract", "--model", str(model), "--task", str(task_file), "--audio-root", str(audio)]
    args += ["--window-seconds", str(WINDOW), "--name", "tiny", "--no-progress"]
    capsys.readouterr()
    assert probe_cli([*args, "--out", str(tmp_path / "bf16"), "--precision", "bfloat16"]) == 2
    error = capsys.readouterr().err.strip()
    assert "CUDA only" in error and "--precision float32" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "bf16").exists()

    copied = tmp_path / "copied"
    shutil.copytree(cache, copied)
    meta = json.loads((copied / "meta.json").read_text())
    (copied / "meta.json").write_text(json.dumps({**meta, "precision": "bfloat16"}))
    assert probe_cli([*args, "--out", str(copied)]) == 2
    error = capsys.readouterr().err
    assert "other precision" in error and str(copied) in error


# --- probe and metrics ------------------------------------------------------------------------


def test_a_probe_on_rendered_music_beats_chance_and_reports_scikit_learns_metrics(cache, tmp_path):
    run = tmp_path / "all"
    args = ["fit", "--features", str(cache), "--layer", "all", "--out", str(run), "--no-progress"]
    assert probe_cli([*args, "--seeds", "2", "--max-epochs", "30", "--lrs", "1e-3", "1e-2"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["mean"]["roc_auc"] >= 0.70, results["mean"]
    assert results["model"] == "tiny" and results["task"] == "rendered" and results["layer"] == "all"
    assert [entry["lr"] for entry in results["lr_search"]] == [1e-3, 1e-2]
    assert results["lr"] == max(results["lr_search"], key=lambda entry: entry["valid_roc_auc"])["lr"]

    predictions = np.load(run / "predictions.npz")
    y_true, scores = predictions["y_true"], predictions["scores"]
    assert scores.shape == (2, 12, len(results["tags"])) and predictions["ids"].shape == (12,)
    kept = (y_true.sum(axis=0) > 0) & (y_true.sum(axis=0) < len(y_true))
    for seed, seed_scores in zip(results["seeds"], scores):
        y, s = y_true[:, kept], seed_scores[:, kept]
        assert seed["roc_auc"] == pytest.approx(roc_auc_score(y, s, average="macro"))
        assert seed["ap"] == pytest.approx(average_precision_score(y, s, average="macro"))
        assert seed["micro_f1"] == pytest.approx(f1_score(y, s >= 0.5, average="micro", zero_division=0))
        assert seed["macro_f1"] == pytest.approx(f1_score(y, s >= 0.5, average="macro", zero_division=0))
        assert sum(seed["layer_weights"]) == pytest.approx(1.0) and seed["lr"] == results["lr"]
    values = [seed["roc_auc"] for seed in results["seeds"]]
    assert results["std"]["roc_auc"] == pytest.approx(np.std(values, ddof=1))


def test_the_test_split_chooses_nothing(cache):
    """Scrambling the test labels leaves the chosen learning rate, the epochs and the probes as
    they were: only the test metrics move."""
    opened = FeatureCache.open(cache)
    test = np.flatnonzero(np.asarray(opened.splits) == "test")
    labels = opened.labels.copy()
    labels[test] = labels[test][::-1]
    scrambled = replace(opened, labels=labels)
    config = ProbeConfig(max_epochs=8, learning_rates=(1e-3, 1e-2), seeds=2)
    first, first_predictions = fit_probe(opened, 1, config, progress=False)
    second, second_predictions = fit_probe(scrambled, 1, config, progress=False)
    assert first["lr_search"] == second["lr_search"] and first["lr"] == second["lr"]
    choices = [(seed["epochs"], seed["best_epoch"], seed["valid_roc_auc"]) for seed in first["seeds"]]
    assert choices == [
        (seed["epochs"], seed["best_epoch"], seed["valid_roc_auc"]) for seed in second["seeds"]
    ]
    np.testing.assert_array_equal(first_predictions["scores"], second_predictions["scores"])


def test_tags_without_both_classes_are_left_out_of_every_metric():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, (40, 4))
    y_true[:, 1] = 0  # no positive
    y_true[:, 3] = 1  # no negative
    y_score = rng.random((40, 4))
    assert evaluable_tags(y_true).tolist() == [True, False, True, False]
    metrics = tagging_metrics(y_true, y_score)
    kept = y_true[:, [0, 2]], y_score[:, [0, 2]]
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(*kept, average="macro"))
    assert metrics["micro_f1"] == pytest.approx(f1_score(kept[0], kept[1] >= 0.5, average="micro"))


def test_the_validation_roc_auc_by_ranks_equals_scikit_learns_with_ties_and_constant_tags():
    """Early stopping's metric: scores rounded to 1 decimal, so most tags have ties, and two tags
    without both classes, which are left out as in `tagging_metrics`."""
    rng = np.random.default_rng(1)
    y_true = rng.random((57, 9)) < np.linspace(0.05, 0.6, 9)
    y_true[:, 2] = False
    y_true[:, 7] = True
    y_score = np.round(rng.random((57, 9)) * 0.6 + 0.4 * y_true, 1)
    kept = evaluable_tags(y_true)
    expected = roc_auc_score(y_true[:, kept], y_score[:, kept], average="macro")
    assert macro_roc_auc(y_true, y_score) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="cannot be scored"):
        macro_roc_auc(y_true[:, [2, 7]], y_score[:, [2, 7]])


# --- report -----------------------------------------------------------------------------------


def _run(model: str, task: str, layer, roc: float, valid: float) -> dict:
    metrics = {
        "roc_auc": roc,
        "ap": roc / 2,
        "micro_f1": roc / 3,
        "macro_f1": roc / 4,
        "valid_roc_auc": valid,
    }
    return {
        "model": model,
        "task": task,
        "layer": layer,
        "mean": metrics,
        "std": dict.fromkeys(metrics, 0.01),
    }


def test_report_tables_pick_layers_on_validation_and_draw_every_plot(tmp_path, cache):
    runs = []
    for model, shift in (("MERT-v1-95M", 0.0), ("lambda_0.2", 0.02), ("lambda_0.5", 0.01)):
        for task in ("lyra", "makam"):
            for layer in (0, 1, 2, "all"):
                # layer 1 has the best test score, layer 2 the best validation score
                test_score = 0.8 + shift + (0.05 if layer == 1 else 0.0)
                runs.append(_run(model, task, layer, test_score, 0.7 + (0.1 if layer == 2 else 0.0)))
    for index, run in enumerate(runs):
        (tmp_path / "runs" / str(index)).mkdir(parents=True)
        (tmp_path / "runs" / str(index) / "results.json").write_text(json.dumps(run))
    table = markdown_tables(runs)
    assert "| MERT-v1-95M | 80.0 ± 1.0 | 40.0 ± 1.0 | 80.0 ± 1.0 | 40.0 ± 1.0 | 60.0 |" in table
    assert "| lambda_0.2 | 2 | 2 |" in table  # the layer of each cell, chosen on validation
    assert table.index("Turkish-makam") < table.index("Lyra")  # the thesis's task order
    written = write_report([tmp_path / "runs"], tmp_path / "report", base="MERT-v1-95M")
    assert set(written) == {"table", "layerwise", "transfer", "lambda_sweep"}
    for path in written.values():
        assert path.stat().st_size > 0
    assert lambda_of("lambda_0.25") == 0.25 and lambda_of("CultureMERT") is None

    # and from real fit runs through the CLI
    main = probe_cli
    for layer in ("0", "2"):
        args = ["fit", "--features", str(cache), "--layer", layer, "--out", str(tmp_path / "fit" / layer)]
        assert main([*args, "--seeds", "1", "--max-epochs", "5", "--lrs", "1e-3", "--no-progress"]) == 0
    assert main(["report", str(tmp_path / "fit"), "--out", str(tmp_path / "fit_report")]) == 0
    assert (tmp_path / "fit_report" / "layerwise_roc_auc.png").is_file()
    assert "| tiny |" in (tmp_path / "fit_report" / "table.md").read_text()


def test_standardize_z_scores_features_with_training_statistics():
    """fit --standardize: every feature has zero mean and unit variance over the training chunks,
    and the other splits are scaled with the same statistics (nothing learnt from them)."""
    from culturemert.probing.probe import ProbeData

    generator = torch.Generator().manual_seed(0)
    features = (torch.randn(10, 3, 4, generator=generator) * 0.01 + 5).half()
    chunks = {"train": torch.arange(6), "valid": torch.arange(6, 8), "test": torch.arange(8, 10)}
    data = ProbeData(features, torch.zeros(10, 2), np.arange(10), chunks, {}, {})
    standard = data.standardized().features.float()
    train = standard[:6]
    assert torch.allclose(train.mean(dim=0), torch.zeros(3, 4), atol=2e-3)
    assert torch.allclose(train.std(dim=0, unbiased=False), torch.ones(3, 4), atol=2e-3)
    mean, std = features[:6].float().mean(0), features[:6].float().std(0, unbiased=False)
    assert torch.allclose(standard[8:], ((features[8:].float() - mean) / std), atol=1e-2)
