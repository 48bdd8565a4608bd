"""Task-vector similarity as files: a CSV of pairwise cosines and norms, and a heatmap (thesis Fig. 4.5)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch

from culturemert.files import write_atomically
from culturemert.merging.analysis import TaskVectorStats
from culturemert.merging.methods import MergeError


def write_similarity(stats: TaskVectorStats, folder: str | os.PathLike) -> tuple[Path, Path]:
    """Pairwise cosine similarity of the task vectors (thesis Fig. 4.5), whole model and per layer:
    ``task_vector_similarity.csv`` (scope, model_a, model_b, cosine, norm_a, norm_b) and a heatmap
    ``task_vector_similarity.png``. Needs at least two models."""
    import matplotlib  # here, not at the top: merging alone does not need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, count = stats.labels, len(stats.labels)
    if count < 2:
        raise MergeError("similarity needs at least two models")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cosine, norms = stats.cosine(), stats.gram.diagonal(dim1=-2, dim2=-1).sqrt()
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["scope", "model_a", "model_b", "cosine", "norm_a", "norm_b"])
    for s, scope in enumerate(stats.scopes):
        for i, j in pairs:
            values = (cosine[s, i, j].item(), norms[s, i].item(), norms[s, j].item())
            writer.writerow([scope, labels[i], labels[j], *(f"{v:.6g}" for v in values)])
    csv_path = folder / "task_vector_similarity.csv"
    write_atomically(csv_path, lambda handle: handle.write(table.getvalue().encode()))

    per_layer = cosine[1:, [i for i, _ in pairs], [j for _, j in pairs]].T.numpy()  # [pairs, layers]
    # One diverging scale for both panels, set by the off-diagonal values (the diagonal is 1).
    limit = (
        max(abs(per_layer).max(), cosine[0][~torch.eye(count, dtype=torch.bool)].abs().max().item()) or 1.0
    )
    style = {"cmap": "coolwarm", "vmin": -limit, "vmax": limit}
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(12, 2 + 0.5 * max(count, len(pairs))), width_ratios=[1, 1.6]
    )
    left.imshow(cosine[0].numpy(), **style)
    for i in range(count):
        for j in range(count):
            left.text(j, i, f"{cosine[0, i, j]:.2f}", ha="center", va="center", fontsize=8)
    left.set_xticks(range(count), labels, rotation=45, ha="right")
    left.set_yticks(range(count), labels)
    left.set_title("whole model")
    image = right.imshow(per_layer, aspect="auto", **style)
    right.set_xticks(range(per_layer.shape[1]))
    right.set_xlabel("transformer layer")
    right.set_yticks(range(len(pairs)), [f"{labels[i]} / {labels[j]}" for i, j in pairs])
    right.set_title("per layer")
    figure.colorbar(image, ax=right, fraction=0.046, label="cosine similarity")
    figure.suptitle("Cosine similarity of task vectors")
    figure.tight_layout()
    png_path = folder / "task_vector_similarity.png"
    write_atomically(png_path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    plt.close(figure)
    return csv_path, png_path
