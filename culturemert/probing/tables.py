"""Tables 4.1 (ROC-AUC, AP) and 4.2 (micro/macro-F1) of the cells of `runs.table_cells`, as
markdown and CSV (thesis 4.1).

A cell shows mean ± std over seeds in percent, the 95 % bootstrap interval over test recordings
in brackets where its run saved its predictions, and for every model but the baseline its
difference to the baseline (``Δ``), with the paired interval where both runs saved predictions,
marked ``*`` when that interval excludes 0. The baseline comes first; the source (Western) tasks
and the target cultures are averaged apart. `note` says which of these the cells carry.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from culturemert.errors import listing
from culturemert.probing.runs import METRIC_TITLES, TASK_TITLES, Key


def ordered_models(cells: dict[Key, dict], baseline: str, order: list[str]) -> list[str]:
    """The models of `order` that have cells, the baseline first."""
    present = {model for model, _ in cells}
    return [baseline] * (baseline in present) + [m for m in order if m in present and m != baseline]


def ordered_tasks(cells: dict[Key, dict], order: list[str]) -> list[str]:
    """The tasks of `order` that have cells."""
    present = {task for _, task in cells}
    return [task for task in order if task in present]


def _points(value: float, sign: bool = False) -> str:
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def cell_text(metric: dict) -> str:
    """``mean ± std [low, high]``, then the difference ``Δ +d [low, high]*`` if any (the brackets
    where there are intervals)."""
    text = f"{_points(metric['mean'])} ± {_points(metric['std'])}"
    if "interval" in metric:
        low, high = metric["interval"]
        text += f" [{_points(low)}, {_points(high)}]"
    if "difference" in metric:
        text += f"<br>Δ {_points(metric['difference'], True)}"
    if "difference_interval" in metric:
        d_low, d_high = metric["difference_interval"]
        mark = "*" if metric["significant"] else ""
        text += f" [{_points(d_low, True)}, {_points(d_high, True)}]{mark}"
    return text


def note(cells: dict[Key, dict], baseline: str, layers_at: str) -> str:
    """What the cells show: percent, the spread, the intervals where there are any (and which
    cells have none), the difference to `baseline`; the layers are listed at `layers_at`."""
    bare = [
        f"{model} on {task}"
        for (model, task), cell in cells.items()
        if "interval" not in cell["metrics"]["roc_auc"]
    ]
    if not bare:
        spread = "mean ± std over seeds [95 % bootstrap interval over test tracks]"
        difference = f"Δ: paired difference to {baseline} [95 % interval], * where the interval excludes 0"
    elif len(bare) == len(cells):
        spread = "mean ± std over seeds; no bootstrap intervals: the runs saved no test predictions"
        difference = f"Δ: difference of the means to {baseline}"
    else:
        spread = (
            "mean ± std over seeds [95 % bootstrap interval over test tracks]; no interval for "
            f"{listing(bare)}: no predictions.npz in the run folder"
        )
        difference = (
            f"Δ: difference to {baseline} [paired 95 % interval where both runs saved predictions], "
            "* where the interval excludes 0"
        )
    layers = f"Each cell is the layer with the best validation ROC-AUC ({layers_at})."
    return f"Percent; {spread}; {difference}. {layers}"


def markdown(
    cells: dict[Key, dict],
    metrics: tuple[str, str],
    models: list[str],
    tasks: list[str],
    source: set[str],
    averaged: bool = True,
) -> str:
    """One table: a row per model, a column per task and metric, then (if `averaged`) the source
    and target averages (mean of the cells present, over tasks and both metrics)."""
    groups = [
        ("Source avg.", [t for t in tasks if t in source]),
        ("Target avg.", [t for t in tasks if t not in source]),
    ]
    groups = [(title, members) for title, members in groups if members and averaged]
    header = ["model"] + [f"{TASK_TITLES.get(t, t)} {METRIC_TITLES[m]}" for t in tasks for m in metrics]
    header += [title for title, _ in groups]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for model in models:
        row = [model]
        for task in tasks:
            for metric in metrics:
                cell = cells.get((model, task))
                row.append(cell_text(cell["metrics"][metric]) if cell else "-")
        for _, members in groups:
            values = [
                cells[(model, t)]["metrics"][m]["mean"]
                for t in members
                if (model, t) in cells
                for m in metrics
            ]
            row.append(_points(float(np.mean(values))) if values else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def layers_markdown(cells: dict[Key, dict], models: list[str], tasks: list[str]) -> str:
    """The layer each cell comes from, a row per model and a column per task."""
    header = ["model"] + [TASK_TITLES.get(t, t) for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for model in models:
        layers = [str(cells[(model, t)]["run"]["layer"]) if (model, t) in cells else "-" for t in tasks]
        lines.append("| " + " | ".join([model, *layers]) + " |")
    return "\n".join(lines)


def csv_rows(cells: dict[Key, dict], metrics: tuple[str, str], models: list[str], tasks: list[str]) -> str:
    """The same cells in long form, in fractions (not percent); empty fields where a cell has no
    interval or difference."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["model", "task", "layer", "metric", "mean", "std", "ci_low", "ci_high",
         "difference", "difference_low", "difference_high", "significant"]
    )  # fmt: skip
    for model in models:
        for task in tasks:
            if (model, task) not in cells:
                continue
            cell = cells[(model, task)]
            for metric in metrics:
                m = cell["metrics"][metric]
                writer.writerow(
                    [model, task, cell["run"]["layer"], metric, m["mean"], m["std"]]
                    + list(m.get("interval", ("", "")))
                    + [
                        m.get("difference", ""),
                        *m.get("difference_interval", ("", "")),
                        m.get("significant", ""),
                    ]
                )
    return buffer.getvalue()
