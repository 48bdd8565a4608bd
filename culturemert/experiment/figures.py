"""The thesis's figures from an experiment's outputs (thesis 4.1-4.6). Each function writes one
PNG and returns its path, or None when the experiment has nothing to plot for it. Error bars
are 95 % bootstrap intervals over test tracks unless the axis label says otherwise."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from culturemert.probing.report import TASK_TITLES, lambda_of, panels

DPI = 120


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path


def _title(task: str) -> str:
    return TASK_TITLES.get(task, task)


def _percent(cell: dict, metric: str = "roc_auc") -> tuple[float, float, float]:
    """Mean and interval of a table cell, in percent."""
    m = cell["metrics"][metric]
    return 100 * m["mean"], 100 * m["interval"][0], 100 * m["interval"][1]


def bars(cells: dict, models: list[str], tasks: list[str], path: Path) -> Path | None:
    """Fig 4.1: ROC-AUC per dataset, one bar per model, with 95 % intervals."""
    if not cells:
        return None
    figure = Figure(figsize=(4.0 + 0.35 * len(tasks) * len(models), 4.2), layout="constrained")
    axis = figure.subplots()
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        points = [_percent(cells[(model, t)]) if (model, t) in cells else (np.nan,) * 3 for t in tasks]
        means = np.array([p[0] for p in points])
        errors = np.array([[p[0] - p[1], p[2] - p[0]] for p in points]).T
        positions = np.arange(len(tasks)) - 0.4 + width * (index + 0.5)
        axis.bar(positions, means, width, yerr=errors, capsize=2, label=model, color=f"C{index}")
    axis.set_xticks(np.arange(len(tasks)), [_title(t) for t in tasks])
    axis.set_ylabel("test ROC-AUC (%)")
    low = min(_percent(c)[1] for c in cells.values())
    axis.set_ylim(max(0, low - 5), 100)
    axis.set_title("Probing ROC-AUC per dataset (best layer; 95 % bootstrap intervals)")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def transfer_matrix(
    cells: dict, baseline: str, models: list[str], tasks: list[str], path: Path
) -> Path | None:
    """Fig 4.2: ROC-AUC of each model minus the baseline's (points), with the paired interval;
    ``*`` where it excludes 0."""
    rows = [m for m in models if m != baseline and any((m, t) in cells for t in tasks)]
    if not rows:
        return None
    values = np.full((len(rows), len(tasks)), np.nan)
    figure = Figure(figsize=(2.5 + 1.7 * len(tasks), 1.2 + 0.7 * len(rows)), layout="constrained")
    axis = figure.subplots()
    for i, model in enumerate(rows):
        for j, task in enumerate(tasks):
            metric = cells.get((model, task), {}).get("metrics", {}).get("roc_auc", {})
            if "difference" in metric:
                values[i, j] = 100 * metric["difference"]
    limit = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
    image = axis.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i, model in enumerate(rows):
        for j, task in enumerate(tasks):
            metric = cells.get((model, task), {}).get("metrics", {}).get("roc_auc", {})
            if "difference" in metric:
                low, high = (100 * v for v in metric["difference_interval"])
                mark = "*" if metric["significant"] else ""
                text = f"{values[i, j]:+.1f}{mark}\n[{low:+.1f}, {high:+.1f}]"
                color = "white" if abs(values[i, j]) > 0.6 * limit else "black"
                axis.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    axis.set_xticks(range(len(tasks)), [_title(t) for t in tasks])
    axis.set_yticks(range(len(rows)), rows)
    axis.set_title(f"ROC-AUC relative to {baseline} (points; * 95 % paired interval excludes 0)")
    figure.colorbar(image, ax=axis, label="Δ ROC-AUC (points)")
    return _save(figure, path)


def _read_matrix(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0][1:], np.array([[float(v) for v in row[1:]] for row in rows[1:]])


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
        image = axis.imshow(matrix, cmap="viridis")
        for i in range(len(names)):
            for j in range(len(names)):
                color = "black" if matrix[i, j] > 0.5 * matrix.max() else "white"  # on viridis
                axis.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize=8, color=color)
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axis.set_yticks(range(len(names)), names)
        axis.set_title(f"Acoustic-token {title}")
        figure.colorbar(image, ax=axis, shrink=0.8)
    return _save(figure, path)


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
    axis = figure.subplots()
    image = axis.imshow(matrix, cmap="coolwarm", vmin=-1, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            axis.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=9)
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_title(f"Task-vector cosine similarity ({scope})")
    figure.colorbar(image, ax=axis, shrink=0.8)
    return _save(figure, path)


def lambda_sweep(cells: dict, sweep: list[str], baseline: str, tasks: list[str], path: Path) -> Path | None:
    """Fig 4.4: ROC-AUC against lambda per dataset, intervals shaded, the baseline dotted."""
    points = sorted((lambda_of(model), model) for model in sweep if lambda_of(model) is not None)
    if len(points) < 2:
        return None
    figure, axes, _ = panels(len(tasks), (4.2, 3.3))
    for axis, task in zip(axes, tasks):
        present = [(value, _percent(cells[(m, task)])) for value, m in points if (m, task) in cells]
        if present:
            xs = [value for value, _ in present]
            axis.plot(xs, [p[0] for _, p in present], marker="o", label="merged")
            axis.fill_between(xs, [p[1] for _, p in present], [p[2] for _, p in present], alpha=0.25)
        if (baseline, task) in cells:
            axis.axhline(_percent(cells[(baseline, task)])[0], color="black", linestyle=":", label=baseline)
        axis.set_title(_title(task))
        axis.set_xlabel("λ")
        axis.set_ylabel("test ROC-AUC (%)")
        axis.legend(fontsize="small")
    figure.suptitle("Task-arithmetic λ sweep (shaded: 95 % bootstrap interval)")
    return _save(figure, path)


def sweep_average(
    cells: dict, sweep: list[str], multi: str | None, tasks: list[str], path: Path
) -> Path | None:
    """Fig 4.6: mean ROC-AUC over the target tasks against lambda, the multi-culture model as a
    dashed level."""
    points = sorted((lambda_of(m), m) for m in sweep if lambda_of(m) is not None)
    if len(points) < 2 or not tasks:
        return None

    def average(model: str) -> float:
        values = [_percent(cells[(model, t)])[0] for t in tasks if (model, t) in cells]
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
    return _save(figure, path)


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
    return _save(figure, path)


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
    return _save(figure, path)


def layerwise(runs: list[dict], models: list[str], tasks: list[str], path: Path) -> Path | None:
    """Fig 4.7: test ROC-AUC (mean ± std over seeds) per layer, a panel per task, a line per model;
    the weighted sum of all layers as a dashed level."""
    by_key = {(r["model"], r["task"], str(r["layer"])): r for r in runs}
    layers = sorted({int(r["layer"]) for r in runs if str(r["layer"]).isdigit()})
    if len(layers) < 2 or not tasks:
        return None
    figure, axes, columns = panels(len(tasks), (3.6, 3.4), (2.5, 0.4), sharey=True)
    for axis, task in zip(axes, tasks):
        for index, model in enumerate(models):
            points = [(layer, by_key.get((model, task, str(layer)))) for layer in layers]
            points = [(layer, run) for layer, run in points if run is not None]
            if points:
                means = [100 * run["mean"]["roc_auc"] for _, run in points]
                stds = [100 * run["std"]["roc_auc"] for _, run in points]
                xs = [layer for layer, _ in points]
                axis.errorbar(xs, means, yerr=stds, marker="o", capsize=2, color=f"C{index}", label=model)
            weighted = by_key.get((model, task, "all"))
            if weighted is not None:
                axis.axhline(
                    100 * weighted["mean"]["roc_auc"], color=f"C{index}", linestyle="--", linewidth=1
                )
        axis.set_title(_title(task))
        axis.set_xticks(layers)
        axis.set_xlabel("layer (dashed: weighted sum of all)")
    low, high = axes[0].get_ylim()
    axes[0].set_ylim(max(low, 0.0), min(high, 100.0))  # shared: a score is a percentage
    for axis in axes[::columns]:
        axis.set_ylabel("test ROC-AUC (%, ± std over seeds)")
    axes[columns - 1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle("Layer-wise probing ROC-AUC")
    return _save(figure, path)
