"""The experiment's own figures (thesis 4.3-4.6, 4.8-4.11): token similarity, task vectors, the
sweep against the multi-culture model, a probe across checkpoints, training curves; the probing
figures are `culturemert.probing.figures`. Each function writes one PNG and returns its path, or
None when the experiment has nothing to plot for it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from culturemert.probing.figures import annotate, panels, percent, save
from culturemert.probing.runs import lambda_of


def _read_matrix(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0][1:], np.array([[float(v) for v in row[1:]] for row in rows[1:]])


def _square(
    figure: Figure, axis: Axes, matrix: np.ndarray, names: list[str], digits: int, title: str, **imshow
) -> None:
    """A square matrix over `names` with its values written in and its colour bar."""
    image = axis.imshow(matrix, **imshow)
    annotate(axis, image, matrix, [[f"{value:.{digits}f}" for value in row] for row in matrix])
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_title(title)
    figure.colorbar(image, ax=axis, shrink=0.8)


def token_similarity(folder: Path, path: Path) -> Path | None:
    """Fig 4.3: Jensen-Shannon divergence and cosine distance of the token distributions."""
    files = [folder / "js_divergence.csv", folder / "cosine_distance.csv"]
    if not all(f.is_file() for f in files):
        return None
    names, _ = _read_matrix(files[0])
    figure = Figure(figsize=(3.0 + 2 * 0.7 * len(names) + 2, 1.8 + 0.6 * len(names)), layout="constrained")
    for axis, file, title in zip(
        figure.subplots(1, 2), files, ("Jensen-Shannon divergence", "cosine distance")
    ):
        names, matrix = _read_matrix(file)
        _square(figure, axis, matrix, names, 3, f"Acoustic-token {title}", cmap="viridis")
    return save(figure, path)


def task_vector_cosine(csv_path: Path, labels: dict[str, str], path: Path) -> Path | None:
    """Fig 4.5: cosine similarity of the task vectors over the whole model, with short names."""
    if not csv_path.is_file():
        return None
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    scope = rows[0]["scope"]
    whole = [row for row in rows if row["scope"] == scope]
    names = list(
        dict.fromkeys(
            [labels.get(r["model_a"], Path(r["model_a"]).name) for r in whole]
            + [labels.get(r["model_b"], Path(r["model_b"]).name) for r in whole]
        )
    )
    matrix = np.eye(len(names))
    for row in whole:
        i = names.index(labels.get(row["model_a"], Path(row["model_a"]).name))
        j = names.index(labels.get(row["model_b"], Path(row["model_b"]).name))
        matrix[i, j] = matrix[j, i] = float(row["cosine"])
    figure = Figure(figsize=(2.5 + 0.9 * len(names), 1.8 + 0.7 * len(names)), layout="constrained")
    title = f"Task-vector cosine similarity ({scope})"
    _square(figure, figure.subplots(), matrix, names, 2, title, cmap="coolwarm", vmin=-1, vmax=1)
    return save(figure, path)


def sweep_average(
    cells: dict, sweep: list[str], multi: str | None, tasks: list[str], path: Path
) -> Path | None:
    """Fig 4.6: mean ROC-AUC over the target tasks against lambda, the multi-culture model as a
    dashed level."""
    points = sorted((lambda_of(m), m) for m in sweep if lambda_of(m) is not None)
    if len(points) < 2 or not tasks:
        return None

    def average(model: str) -> float:
        values = [percent(cells[(model, t)])[0] for t in tasks if (model, t) in cells]
        return float(np.mean(values)) if len(values) == len(tasks) else np.nan

    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    axis.plot([v for v, _ in points], [average(m) for _, m in points], marker="o", label="task arithmetic")
    if multi is not None and np.isfinite(average(multi)):
        axis.axhline(average(multi), color="C3", linestyle="--", label=multi)
    axis.set_xlabel("λ")
    axis.set_ylabel("mean test ROC-AUC over target tasks (%)")
    axis.set_title("Merged models against the multi-culture model")
    axis.legend(fontsize="small")
    return save(figure, path)


def checkpoint_curve(
    runs: list[dict], title: str, start: tuple[float, float] | None, path: Path
) -> Path | None:
    """Fig 4.8: one probe's test ROC-AUC (mean ± std over seeds) across a run's kept checkpoints."""
    points = sorted((int(run["model"].rsplit("@", 1)[1]), run) for run in runs if "@" in run["model"])
    if not points:
        return None
    xs = [updates for updates, _ in points]
    means = [100 * run["mean"]["roc_auc"] for _, run in points]
    stds = [100 * run["std"]["roc_auc"] for _, run in points]
    if start is not None:
        xs, means, stds = [0, *xs], [start[0], *means], [start[1], *stds]
    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    axis.errorbar(xs, means, yerr=stds, marker="o", capsize=2)
    low, high = min(np.subtract(means, stds)), max(np.add(means, stds))
    axis.set_ylim(max(0.0, low - 2), min(100.0, high + 2))  # a score is a percentage
    axis.set_xlabel("updates (all stages)")
    axis.set_ylabel("test ROC-AUC (%, ± std over seeds)")
    axis.set_title(title)
    return save(figure, path)


def training_curves(
    curves: dict[str, dict], keys: list[str], ylabel: str, title: str, path: Path, log_scale: bool = False
) -> Path | None:
    """Figs 4.9-4.11: `keys` of each run's fairseq log against updates, stages joined, a dotted
    line where a stage starts."""
    runs = {name: stages for name, stages in curves.items() if stages}
    if not runs:
        return None
    figure, axes, _ = panels(len(runs), (4.5, 3.3))
    for axis, (name, stages) in zip(axes, runs.items()):
        offset = 0
        for stage, values in stages.items():
            updates = np.array(values.get("num_updates", [])) + offset
            for index, key in enumerate(keys):
                if key in values:
                    label = key if stage == next(iter(stages)) else None
                    axis.plot(updates, values[key], color=f"C{index}", label=label, linewidth=1)
            if offset:
                axis.axvline(offset, color="grey", linestyle=":")
            offset = updates[-1] if len(updates) else offset
        axis.set_title(f"{name} ({', '.join(stages)})")
        axis.set_xlabel("updates (dotted: next stage)")
        axis.set_ylabel(ylabel)
        if log_scale:
            axis.set_yscale("log")
        if len(keys) > 1:
            axis.legend(fontsize="x-small", ncols=2)
    figure.suptitle(title)
    return save(figure, path)
