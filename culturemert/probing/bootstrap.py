"""Uncertainty of the probing scores: spread over seeds and a bootstrap over test recordings.

A probe run's cell (one model, task and layer) is the mean over its seeds of a tagging metric
(`culturemert.probing.metrics`; thesis 3.5.2, App. A.2). Its 95 % interval comes from resampling
the test recordings with replacement: on each resample the metric of every seed is computed on the
drawn recordings and averaged over the seeds; the interval is the 2.5 and 97.5 percentiles of
those averages. A paired bootstrap compares a model with a baseline on the *same* resampled
recordings; a difference is marked when its interval excludes 0.

A resample is a vector of counts (how often each recording was drawn), used as sample weights:
ROC-AUC, AP and F1 with weights equal the metrics of the resample with its repeated rows, as
scikit-learn computes them with ``sample_weight=counts``. They are computed for all resamples at
once with one sort per tag and seed, fast enough for MTAT (4,300 tracks x 50 tags x 5 seeds x
1,000 resamples). As in `tagging_metrics`, a tag counts in a resample's macro averages (and its
micro-F1) only when the resample holds a positive and a negative recording of it; a resample
without any such tag (possible only on a tiny test set) is left out of the interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from culturemert.errors import UserError
from culturemert.probing.metrics import METRICS, THRESHOLD

RESAMPLES = 1000
CONFIDENCE = 0.95


class BootstrapError(UserError):
    """Predictions that cannot be compared; the message names the files."""


@dataclass(frozen=True)
class Predictions:
    """The test predictions of one probe run (``predictions.npz`` of `probe.write_run`)."""

    ids: np.ndarray  # [recordings]
    y_true: np.ndarray  # [recordings, tags] of 0/1
    scores: np.ndarray  # [seeds, recordings, tags] of probabilities

    @classmethod
    def load(cls, path: str | Path) -> Predictions:
        """Read ``predictions.npz`` (a run folder or the file itself), without pickle."""
        path = Path(path)
        path = path / "predictions.npz" if path.is_dir() else path
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    data["ids"].astype(str), data["y_true"].astype(bool), data["scores"].astype(np.float64)
                )
        except (OSError, KeyError, ValueError) as error:
            raise BootstrapError(f"{path}: not a probe run's predictions.npz ({error})") from None

    def columns(self, tags: Sequence[int]) -> Predictions:
        """These predictions on the tags at the columns `tags` only."""
        return Predictions(self.ids, self.y_true[:, tags], self.scores[:, :, tags])

    def aligned(self, other: Predictions, what: str) -> Predictions:
        """`other`'s predictions in this run's recording order; the same recordings and labels."""
        if len(other.ids) != len(self.ids) or set(other.ids) != set(self.ids):
            raise BootstrapError(
                f"{what}: the two runs were tested on different recordings; cannot pair them"
            )
        order = {recording: index for index, recording in enumerate(other.ids)}
        rows = np.array([order[recording] for recording in self.ids])
        moved = Predictions(other.ids[rows], other.y_true[rows], other.scores[:, rows])
        if moved.y_true.shape != self.y_true.shape or (moved.y_true != self.y_true).any():
            raise BootstrapError(f"{what}: the two runs have different test labels; cannot pair them")
        return moved


def resample_counts(recordings: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """How often each recording is drawn in each of `resamples` draws of `recordings` with
    replacement: [resamples, recordings] integer counts, each row summing to `recordings`."""
    draws = np.random.default_rng(seed).integers(0, recordings, size=(resamples, recordings))
    offsets = (np.arange(resamples) * recordings)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=resamples * recordings).reshape(
        resamples, recordings
    )


def _ranking_metrics(
    labels: np.ndarray, scores: np.ndarray, drawn: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ROC-AUC and AP of one tag for every resample, `drawn` being the counts transposed
    ([recordings, resamples], small integers): [resamples] each (NaN where a resample lacks
    positives or negatives). Ties count half for ROC-AUC (the trapezoid of the ROC curve); AP sums,
    over positives, their weight times the precision at their score. One sort of the tag's scores
    serves every resample; the counts are summed in that order only between the positives."""
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    positive = order[labels[order]]  # the positives in ascending score
    pos_scores = scores[positive]
    pos_counts = drawn[positive].astype(np.float64)
    pos_cum = np.zeros((len(positive) + 1, drawn.shape[1]))
    np.cumsum(pos_counts, axis=0, out=pos_cum[1:])
    lower, upper = (np.searchsorted(ranked, pos_scores, side=side) for side in ("left", "right"))
    pos_lower, pos_upper = (np.searchsorted(pos_scores, pos_scores, side=side) for side in ("left", "right"))
    # draws ranked below each needed position: sums of the runs between positions, accumulated
    cuts = np.unique(np.concatenate([[0], lower, upper]))
    cuts = cuts[cuts < len(scores)]
    runs = np.add.reduceat(drawn[order], cuts, axis=0, dtype=np.int64 if len(scores) >= 2**16 else np.uint16)
    every_cum = np.zeros((len(cuts) + 1, drawn.shape[1]))
    np.cumsum(runs, axis=0, out=every_cum[1:])
    at = np.append(cuts, len(scores))
    neg_below = every_cum[np.searchsorted(at, lower)] - pos_cum[pos_lower]  # negatives scored lower
    neg_not_above = every_cum[np.searchsorted(at, upper)] - pos_cum[pos_upper]  # ... or equal
    total_pos, total_neg = pos_cum[-1], every_cum[-1] - pos_cum[-1]
    wins = (pos_counts * (neg_below + neg_not_above)).sum(axis=0) / 2
    true_above = total_pos - pos_cum[pos_lower]
    false_above = total_neg - neg_below
    precision = np.divide(
        true_above, true_above + false_above, out=np.zeros_like(true_above), where=pos_counts > 0
    )
    valid = (total_pos > 0) & (total_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        roc_auc = np.where(valid, wins / (total_pos * total_neg), np.nan)
        ap = np.where(valid, (pos_counts * precision).sum(axis=0) / total_pos, np.nan)
    return roc_auc, ap


def weighted_metrics(y_true: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """The four tagging metrics of one seed's scores [recordings, tags] on each resample
    (`counts` [resamples, recordings]): {metric: [resamples]}, as `tagging_metrics` on the rows of
    the resample (module docstring)."""
    y_true = y_true.astype(bool)
    weights = counts.astype(np.float32)  # integer sums stay exact below 2**24
    drawn = np.ascontiguousarray(counts.T.astype(np.uint8 if counts.max() < 256 else np.int64))
    positives = weights @ y_true.astype(np.float32)
    kept = (positives > 0) & (positives < weights.sum(axis=1, keepdims=True))  # [resamples, tags]
    ranking = [_ranking_metrics(y_true[:, tag], scores[:, tag], drawn) for tag in range(y_true.shape[1])]
    roc_auc = np.stack([auc for auc, _ in ranking], axis=1)
    ap = np.stack([ap for _, ap in ranking], axis=1)
    predicted = scores >= THRESHOLD
    true_pos = weights @ (predicted & y_true).astype(np.float32)
    false_pos = weights @ (predicted & ~y_true).astype(np.float32)
    false_neg = weights @ (~predicted & y_true).astype(np.float32)
    true_pos, false_pos, false_neg = (
        np.where(kept, value, 0.0).astype(np.float64) for value in (true_pos, false_pos, false_neg)
    )
    denominator = 2 * true_pos + false_pos + false_neg
    per_tag_f1 = np.divide(2 * true_pos, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    micro_denominator = denominator.sum(axis=1)
    tags_kept = np.where(kept.any(axis=1), kept.sum(axis=1), np.nan)  # NaN: no tag can be scored
    return {
        "roc_auc": np.where(kept, roc_auc, 0.0).sum(axis=1) / tags_kept,
        "ap": np.where(kept, ap, 0.0).sum(axis=1) / tags_kept,
        "micro_f1": np.divide(
            2 * true_pos.sum(axis=1),
            micro_denominator,
            out=np.where(np.isnan(tags_kept), np.nan, 0.0),
            where=micro_denominator > 0,
        ),
        "macro_f1": per_tag_f1.sum(axis=1) / tags_kept,
    }


def seed_mean_metrics(predictions: Predictions, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric averaged over the seeds, per resample: {metric: [resamples]}."""
    per_seed = [weighted_metrics(predictions.y_true, scores, counts) for scores in predictions.scores]
    return {metric: np.mean([seed[metric] for seed in per_seed], axis=0) for metric in METRICS}


def interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central percentile interval of bootstrap values, over the resamples that could be
    scored (NaN marks a resample without a scorable tag: only on tiny test sets)."""
    tail = 100 * (1 - confidence) / 2
    if np.isnan(values).all():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_cell(
    predictions: Predictions,
    baseline: Predictions | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    what: str = "predictions",
) -> dict[str, dict]:
    """Per metric: the mean and std over seeds on the full test split, the 95 % bootstrap interval
    of the seed mean, and (given a `baseline` run on the same recordings) the paired difference
    with its interval and whether the interval excludes 0."""
    counts = resample_counts(len(predictions.ids), resamples, seed)
    full = np.ones((1, len(predictions.ids)), dtype=np.int64)
    point = [weighted_metrics(predictions.y_true, scores, full) for scores in predictions.scores]
    resampled = seed_mean_metrics(predictions, counts)
    if baseline is not None:
        baseline = predictions.aligned(baseline, what)
        base_point = seed_mean_metrics(baseline, full)
        base_resampled = seed_mean_metrics(baseline, counts)
    cells = {}
    for metric in METRICS:
        values = np.array([seed[metric][0] for seed in point])
        cell = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "interval": interval(resampled[metric]),
        }
        if baseline is not None:
            low, high = interval(resampled[metric] - base_resampled[metric])
            cell["difference"] = cell["mean"] - float(base_point[metric][0])
            cell["difference_interval"] = (low, high)
            cell["significant"] = bool(low > 0 or high < 0)
        cells[metric] = cell
    return cells
