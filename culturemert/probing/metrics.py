"""Tagging metrics of the probing evaluation, from scikit-learn (thesis App. A.2), and the
validation ROC-AUC of early stopping by ranks (equal to scikit-learn's, faster per epoch).

Chunk outputs are averaged per recording (thesis 3.5.2; the probe averages logits, then takes
the sigmoid). The metrics of per-recording probabilities are macro ROC-AUC, macro average
precision, and micro- and macro-F1 at threshold 0.5.

Tags without both a positive and a negative recording in the evaluated split have no ROC-AUC.
They are left out of every metric of that split (the four metrics are computed on the same
columns), and the caller reports them by name: `evaluable_tags` says which are kept.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

THRESHOLD = 0.5
METRICS = ("roc_auc", "ap", "micro_f1", "macro_f1")


def average_by_recording(
    chunk_outputs: np.ndarray, chunk_recording: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Mean of the chunk outputs [chunks, tags] of each recording of `rows`, whose chunks are those
    with ``chunk_recording == row``; [len(rows), tags]. Every row must have a chunk."""
    position = {int(row): index for index, row in enumerate(rows)}
    owner = np.array([position.get(int(row), -1) for row in chunk_recording])
    keep = owner >= 0
    sums = np.zeros((len(rows), chunk_outputs.shape[1]), dtype=np.float64)
    np.add.at(sums, owner[keep], chunk_outputs[keep])
    counts = np.bincount(owner[keep], minlength=len(rows))
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} recordings have no chunk")
    return sums / counts[:, None]


def evaluable_tags(y_true: np.ndarray) -> np.ndarray:
    """Boolean mask of the tags with at least one positive and one negative recording."""
    positives = y_true.sum(axis=0)
    return (positives > 0) & (positives < len(y_true))


def scored_tags(y_true: np.ndarray) -> np.ndarray:
    """`evaluable_tags`, or ValueError when no tag can be scored."""
    kept = evaluable_tags(y_true)
    if not kept.any():
        raise ValueError("no tag has both a positive and a negative recording; the split cannot be scored")
    return kept


def macro_roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Macro ROC-AUC of scores [recordings, tags] on the `evaluable_tags`, equal to scikit-learn's
    ``roc_auc_score(average="macro")`` (ties count half) by the rank-sum (Mann-Whitney) form:
    AUC = (sum of the positives' average ranks - P (P + 1) / 2) / (P N). The probe's early
    stopping scores validation every epoch, where scikit-learn's input checks cost more than
    the probe's training steps."""
    kept = scored_tags(y_true)
    positive = y_true[:, kept].astype(bool)
    ranks = rankdata(y_score[:, kept], axis=0)
    count = positive.sum(axis=0)
    wins = (ranks * positive).sum(axis=0) - count * (count + 1) / 2
    return float(np.mean(wins / (count * (len(positive) - count))))


def tagging_metrics(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """Macro ROC-AUC, macro AP, micro-F1 and macro-F1 (at `THRESHOLD`) of scores [recordings, tags]
    on the columns kept by `evaluable_tags`."""
    kept = scored_tags(y_true)
    y_true, y_score = y_true[:, kept], y_score[:, kept]
    predicted = (y_score >= THRESHOLD).astype(int)
    return {
        "roc_auc": float(roc_auc_score(y_true, y_score, average="macro")),
        "ap": float(average_precision_score(y_true, y_score, average="macro")),
        "micro_f1": float(f1_score(y_true, predicted, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, predicted, average="macro", zero_division=0)),
    }
