"""The probing figures of the thesis (4.1, 4.2, 4.4, 4.7) from the cells of `runs.table_cells`
or the runs themselves. Each function writes one PNG and returns its path, or None when there
is nothing to plot. Error bars are 95 % bootstrap intervals over test tracks where the cells
carry them (the title says when they do not) unless the axis label says otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from culturemert.files import write_atomically
from culturemert.probing.runs import TASK_TITLES, lambda_of

DPI = 120


def save(figure: Figure, path: Path) -> Path:
    """Write `figure` to `path` as PNG at the report's resolution, atomically; returns `path`."""
    write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=DPI))
    return path


def annotate(axis: Axes, image: AxesImage, values: np.ndarray, texts: list[list[str]]) -> None:
    """Write each cell's text (none where empty) on the matrix `image` drawn of `values`: dark on
    light colours, light on dark ones."""
    for (i, j), value in np.ndenumerate(values):
        if texts[i][j]:
            red, green, blue, _ = image.cmap(image.norm(value))
            color = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            axis.text(j, i, texts[i][j], ha="center", va="center", fontsize=8, color=color)


def task_title(task: str) -> str:
    """The dataset's name as the thesis writes it."""
    return TASK_TITLES.get(task, task)


def percent(cell: dict, metric: str = "roc_auc") -> tuple[float, float, float]:
    """Mean and interval of a table cell, in percent (the mean twice where it has no interval)."""
    m = cell["metrics"][metric]
    low, high = m.get("interval", (m["mean"], m["mean"]))
    return 100 * m["mean"], 100 * low, 100 * high


def panels(
    count: int, panel: tuple[float, float], margin: tuple[float, float] = (0.0, 0.0), **subplots
) -> tuple[Figure, np.ndarray, int]:
    """A constrained figure of `count` panels in rows of at most three, each about `panel`
    inches (plus `margin` for the whole figure); returns it, its axes (those past `count`
    hidden) and the number of columns."""
    columns = min(3, count)
    rows = -(-count // columns)
    size = (margin[0] + panel[0] * columns, margin[1] + panel[1] * rows)
    figure = Figure(figsize=size, layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, **subplots)).ravel()
    for axis in axes[count:]:
        axis.set_visible(False)
    return figure, axes, columns


def bars(cells: dict, models: list[str], tasks: list[str], path: Path) -> Path | None:
    """Fig 4.1: ROC-AUC per dataset, one bar per model, with 95 % intervals."""
    if not cells:
        return None
    figure = Figure(figsize=(4.0 + 0.35 * len(tasks) * len(models), 4.2), layout="constrained")
    axis = figure.subplots()
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        points = [percent(cells[(model, t)]) if (model, t) in cells else (np.nan,) * 3 for t in tasks]
        means = np.array([p[0] for p in points])
        errors = np.array([[p[0] - p[1], p[2] - p[0]] for p in points]).T
        positions = np.arange(len(tasks)) - 0.4 + width * (index + 0.5)
        axis.bar(positions, means, width, yerr=errors, capsize=2, label=model, color=f"C{index}")
    axis.set_xticks(np.arange(len(tasks)), [task_title(t) for t in tasks])
    axis.set_ylabel("test ROC-AUC (%)")
    low = min(percent(c)[1] for c in cells.values())
    axis.set_ylim(max(0, low - 5), 100)
    axis.set_title("Probing ROC-AUC per dataset (best layer; 95 % bootstrap intervals)")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(figure, path)


def _difference_text(metric: dict) -> str:
    """A transfer-matrix cell: the difference in points, with its paired interval if any."""
    if "difference" not in metric:
        return ""
    text = f"{100 * metric['difference']:+.1f}"
    if "difference_interval" in metric:
        low, high = (100 * v for v in metric["difference_interval"])
        text += f"{'*' if metric['significant'] else ''}\n[{low:+.1f}, {high:+.1f}]"
    return text


def transfer_matrix(
    cells: dict, baseline: str, models: list[str], tasks: list[str], path: Path
) -> Path | None:
    """Fig 4.2: ROC-AUC of each model minus the baseline's (points), with the paired interval
    where there is one; ``*`` where it excludes 0."""
    rows = [m for m in models if m != baseline and any((m, t) in cells for t in tasks)]
    if not rows:
        return None
    metrics = [[cells.get((m, t), {}).get("metrics", {}).get("roc_auc", {}) for t in tasks] for m in rows]
    values = np.array([[100 * m.get("difference", np.nan) for m in row] for row in metrics])
    texts = [[_difference_text(m) for m in row] for row in metrics]
    paired = any("difference_interval" in m for row in metrics for m in row)
    figure = Figure(figsize=(2.5 + 1.7 * len(tasks), 1.2 + 0.7 * len(rows)), layout="constrained")
    axis = figure.subplots()
    limit = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
    image = axis.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    annotate(axis, image, values, texts)
    axis.set_xticks(range(len(tasks)), [task_title(t) for t in tasks])
    axis.set_yticks(range(len(rows)), rows)
    what = "* 95 % paired interval excludes 0" if paired else "no intervals: no saved predictions"
    axis.set_title(f"ROC-AUC relative to {baseline} (points; {what})")
    figure.colorbar(image, ax=axis, label="Δ ROC-AUC (points)")
    return save(figure, path)


def lambda_sweep(cells: dict, sweep: list[str], baseline: str, tasks: list[str], path: Path) -> Path | None:
    """Fig 4.4: ROC-AUC against lambda per dataset, intervals shaded, the baseline dotted."""
    points = sorted((lambda_of(model), model) for model in sweep if lambda_of(model) is not None)
    if len(points) < 2:
        return None
    figure, axes, _ = panels(len(tasks), (4.2, 3.3))
    shaded = False
    for axis, task in zip(axes, tasks):
        present = [(value, cells[(m, task)]) for value, m in points if (m, task) in cells]
        if present:
            xs = [value for value, _ in present]
            axis.plot(xs, [percent(cell)[0] for _, cell in present], marker="o", label="merged")
            if all("interval" in cell["metrics"]["roc_auc"] for _, cell in present):
                lows, highs = zip(*(percent(cell)[1:] for _, cell in present))
                axis.fill_between(xs, lows, highs, alpha=0.25)
                shaded = True
        if (baseline, task) in cells:
            axis.axhline(percent(cells[(baseline, task)])[0], color="black", linestyle=":", label=baseline)
        axis.set_title(task_title(task))
        axis.set_xlabel("λ")
        axis.set_ylabel("test ROC-AUC (%)")
        axis.legend(fontsize="small")
    what = "shaded: 95 % bootstrap interval" if shaded else "no intervals: no saved predictions"
    figure.suptitle(f"Task-arithmetic λ sweep ({what})")
    return save(figure, path)


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
        axis.set_title(task_title(task))
        axis.set_xticks(layers)
        axis.set_xlabel("layer (dashed: weighted sum of all)")
    low, high = axes[0].get_ylim()
    axes[0].set_ylim(max(low, 0.0), min(high, 100.0))  # shared: a score is a percentage
    for axis in axes[::columns]:
        axis.set_ylabel("test ROC-AUC (%, ± std over seeds)")
    axes[columns - 1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle("Layer-wise probing ROC-AUC")
    return save(figure, path)
