"""The bootstrap of probing scores against scikit-learn with bootstrap counts as sample weights."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from culturemert.probing.bootstrap import (
    BootstrapError,
    Predictions,
    bootstrap_cell,
    interval,
    resample_counts,
    weighted_metrics,
)
from culturemert.probing.metrics import tagging_metrics


def fixed_predictions(recordings: int = 30, tags: int = 4, seeds: int = 2, seed: int = 0) -> Predictions:
    """Labels with a rare tag, scores rounded to one decimal so that many tie."""
    rng = np.random.default_rng(seed)
    y_true = rng.random((recordings, tags)) < np.linspace(0.1, 0.6, tags)
    y_true[0, 0], y_true[1, 0] = True, False
    scores = np.round(np.clip(0.5 * y_true + rng.random((seeds, recordings, tags)) * 0.7, 0, 1), 1)
    return Predictions(np.array([f"r{i}" for i in range(recordings)]), y_true, scores)


def sklearn_metrics(y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """The four metrics with scikit-learn, on the tags with a positive and a negative of weight."""
    positives = weights @ y_true
    kept = (positives > 0) & (positives < weights.sum())
    y, s = y_true[:, kept].astype(int), scores[:, kept]
    predicted = (s >= 0.5).astype(int)
    return {
        "roc_auc": roc_auc_score(y, s, average="macro", sample_weight=weights),
        "ap": average_precision_score(y, s, average="macro", sample_weight=weights),
        "micro_f1": f1_score(y, predicted, average="micro", sample_weight=weights, zero_division=0),
        "macro_f1": f1_score(y, predicted, average="macro", sample_weight=weights, zero_division=0),
    }


def test_counts_are_draws_with_replacement():
    counts = resample_counts(50, 200, seed=3)
    assert counts.shape == (200, 50)
    assert (counts.sum(axis=1) == 50).all()
    assert (counts == 0).any(axis=1).mean() > 0.9  # almost every draw leaves recordings out
    assert (resample_counts(50, 200, seed=3) == counts).all()


def test_every_resample_equals_scikit_learn_with_sample_weights():
    predictions = fixed_predictions()
    counts = resample_counts(len(predictions.ids), 40, seed=1)
    for scores in predictions.scores:
        ours = weighted_metrics(predictions.y_true, scores, counts)
        for index, weights in enumerate(counts):
            expected = sklearn_metrics(predictions.y_true, scores, weights)
            for metric, value in expected.items():
                assert ours[metric][index] == pytest.approx(value, abs=1e-12), (metric, index)


def test_weights_equal_repeated_rows():
    predictions = fixed_predictions(seed=5)
    counts = resample_counts(len(predictions.ids), 5, seed=2)
    scores = predictions.scores[0]
    ours = weighted_metrics(predictions.y_true, scores, counts)
    for index, weights in enumerate(counts):
        rows = np.repeat(np.arange(len(weights)), weights)
        y, s = predictions.y_true[rows], scores[rows]
        expected = tagging_metrics(y.astype(int), s)
        for metric, value in expected.items():
            assert ours[metric][index] == pytest.approx(value, abs=1e-12)


def test_cell_point_estimate_is_the_seed_mean_of_tagging_metrics():
    predictions = fixed_predictions(seeds=3)
    cell = bootstrap_cell(predictions, resamples=50)
    for metric in ("roc_auc", "ap", "micro_f1", "macro_f1"):
        per_seed = [tagging_metrics(predictions.y_true.astype(int), s)[metric] for s in predictions.scores]
        assert cell[metric]["mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert cell[metric]["std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
        low, high = cell[metric]["interval"]
        assert low <= high


def test_paired_difference_against_an_independent_loop():
    model, base = fixed_predictions(seed=0), fixed_predictions(seed=0)
    rng = np.random.default_rng(9)
    base = Predictions(
        base.ids, base.y_true, np.clip(base.scores + rng.normal(0, 0.3, base.scores.shape), 0, 1)
    )
    # the baseline stored in another recording order: pairing must follow the ids
    order = rng.permutation(len(base.ids))
    shuffled = Predictions(base.ids[order], base.y_true[order], base.scores[:, order])
    cell = bootstrap_cell(model, shuffled, resamples=60, seed=4)
    counts = resample_counts(len(model.ids), 60, seed=4)

    def seed_mean(run: Predictions, weights: np.ndarray) -> dict[str, float]:
        per_seed = [sklearn_metrics(run.y_true, s, weights) for s in run.scores]
        return {metric: np.mean([values[metric] for values in per_seed]) for metric in per_seed[0]}

    resampled = [(seed_mean(model, weights), seed_mean(base, weights)) for weights in counts]
    full = np.ones(len(model.ids))
    ours, theirs = seed_mean(model, full), seed_mean(base, full)
    for metric in ("roc_auc", "ap", "micro_f1", "macro_f1"):
        low, high = interval(np.array([a[metric] - b[metric] for a, b in resampled]))
        assert cell[metric]["difference_interval"] == pytest.approx((low, high), abs=1e-12)
        assert cell[metric]["significant"] == (low > 0 or high < 0)
        assert cell[metric]["difference"] == pytest.approx(ours[metric] - theirs[metric], abs=1e-12)


def test_a_clearly_better_model_is_marked_and_itself_is_not():
    predictions = fixed_predictions(recordings=200, seed=2)
    noise = np.random.default_rng(0).random(predictions.scores.shape)
    random_scores = Predictions(predictions.ids, predictions.y_true, noise)
    better = bootstrap_cell(predictions, random_scores, resamples=200)
    same = bootstrap_cell(predictions, predictions, resamples=200)
    assert better["roc_auc"]["significant"] and better["roc_auc"]["difference"] > 0
    assert not same["roc_auc"]["significant"] and same["roc_auc"]["difference"] == 0


def test_runs_on_different_recordings_are_refused():
    predictions = fixed_predictions()
    other = Predictions(np.array([f"x{i}" for i in range(30)]), predictions.y_true, predictions.scores)
    with pytest.raises(BootstrapError, match="different recordings"):
        bootstrap_cell(predictions, other, resamples=10, what="makam layer 6")


def test_load_reads_a_run_folder_and_refuses_other_files(tmp_path):
    predictions = fixed_predictions()
    np.savez(
        tmp_path / "predictions.npz",
        ids=predictions.ids,
        tags=np.array(["a", "b", "c", "d"]),
        y_true=predictions.y_true.astype(np.uint8),
        scores=predictions.scores.astype(np.float32),
        seeds=np.arange(2),
    )
    loaded = Predictions.load(tmp_path)
    assert (loaded.ids == predictions.ids).all() and (loaded.y_true == predictions.y_true).all()
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BootstrapError, match="bad.npz"):
        Predictions.load(tmp_path / "bad.npz")


def test_resamples_without_a_scorable_tag_are_left_out_of_the_interval():
    y_true = np.array([[1], [0], [0]], dtype=bool)
    scores = np.array([[[0.9], [0.2], [0.6]]])
    counts = np.array([[3, 0, 0], [1, 1, 1], [0, 2, 1]])
    metrics = weighted_metrics(y_true, scores[0], counts)
    assert np.isnan(metrics["roc_auc"][[0, 2]]).all() and metrics["roc_auc"][1] == 1.0
    cell = bootstrap_cell(Predictions(np.array(["a", "b", "c"]), y_true, scores), resamples=50)
    low, high = cell["roc_auc"]["interval"]
    assert np.isfinite([low, high]).all() and high <= 1.0
