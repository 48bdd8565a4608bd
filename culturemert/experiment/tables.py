"""Tables 4.1 (ROC-AUC, AP) and 4.2 (micro/macro-F1) with their uncertainty, as markdown and CSV.

Each cell is the run of its (model, task) with the best validation ROC-AUC
(`culturemert.probing.report.best_runs`; the layer is listed below the tables), shown as mean ±
std over seeds in percent with the 95 % bootstrap interval over test recordings
(`culturemert.probing.bootstrap`). Every other model's cell also carries its paired difference
to the baseline (the start model unless the experiment names another), marked ``*`` when the
interval of the difference excludes 0. The baseline comes first; the source (Western) tasks and
the target cultures are averaged apart.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from culturemert.files import write_atomically
from culturemert.probing.bootstrap import Predictions, bootstrap_cell
from culturemert.probing.report import METRIC_TITLES, TABLES, TASK_TITLES, best_runs

Key = tuple[str, str]  # (model, task)


def load_probe_runs(root: Path) -> list[dict]:
    """The results.json of every probe run under `root`, each with its folder as ``run_dir``."""
    runs = []
    for path in sorted(root.rglob("results.json")):
        run = json.loads(path.read_text())
        run["run_dir"] = str(path.parent)
        runs.append(run)
    return runs


def uncertainty(runs: list[dict], baseline: str, resamples: int, seed: int = 0) -> dict[Key, dict]:
    """Per (model, task): the best run and `bootstrap_cell` of its predictions (paired with the
    baseline's best run on the task where there is one)."""
    best = best_runs(runs)
    predictions = {key: Predictions.load(run["run_dir"]) for key, run in best.items()}
    cells = {}
    for (model, task), run in best.items():
        base = predictions.get((baseline, task)) if model != baseline else None
        what = f"{model} vs {baseline} on {task}"
        cells[(model, task)] = {
            "run": run,
            "metrics": bootstrap_cell(predictions[(model, task)], base, resamples, seed, what),
        }
    return cells


def _points(value: float, sign: bool = False) -> str:
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def cell_text(metric: dict) -> str:
    """``mean ± std [low, high]``, then the paired difference ``Δ +d [low, high]*`` if any."""
    low, high = metric["interval"]
    text = f"{_points(metric['mean'])} ± {_points(metric['std'])} [{_points(low)}, {_points(high)}]"
    if "difference" in metric:
        d_low, d_high = metric["difference_interval"]
        mark = "*" if metric["significant"] else ""
        text += (
            f"<br>Δ {_points(metric['difference'], True)} "
            f"[{_points(d_low, True)}, {_points(d_high, True)}]{mark}"
        )
    return text


def ordered_models(cells: dict[Key, dict], baseline: str, order: list[str]) -> list[str]:
    present = {model for model, _ in cells}
    return [baseline] * (baseline in present) + [m for m in order if m in present and m != baseline]


def ordered_tasks(cells: dict[Key, dict], order: list[str]) -> list[str]:
    present = {task for _, task in cells}
    return [task for task in order if task in present]


def markdown(
    cells: dict[Key, dict], metrics: tuple[str, str], models: list[str], tasks: list[str], source: set[str]
) -> str:
    """One table: a row per model, a column per task and metric, then the source and target
    averages (mean of the cells present, over tasks and both metrics)."""
    groups = [
        ("Source avg.", [t for t in tasks if t in source]),
        ("Target avg.", [t for t in tasks if t not in source]),
    ]
    groups = [(title, members) for title, members in groups if members]
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


def csv_rows(cells: dict[Key, dict], metrics: tuple[str, str], models: list[str], tasks: list[str]) -> str:
    """The same cells in long form, in fractions (not percent)."""
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
                paired = (
                    [m["difference"], *m["difference_interval"], m["significant"]]
                    if "difference" in m
                    else [""] * 4
                )
                writer.writerow(
                    [model, task, cell["run"]["layer"], metric, m["mean"], m["std"], *m["interval"], *paired]
                )
    return buffer.getvalue()


def write_tables(
    cells: dict[Key, dict],
    baseline: str,
    model_order: list[str],
    task_order: list[str],
    source: set[str],
    out_dir: Path,
) -> list[Path]:
    """table_4_1.{md,csv}, table_4_2.{md,csv} and layers.md into `out_dir`."""
    models = ordered_models(cells, baseline, model_order)
    tasks = ordered_tasks(cells, task_order)
    written = []
    note = (
        f"Percent; mean ± std over seeds [95 % bootstrap interval over test tracks]; Δ: paired difference "
        f"to {baseline} [95 % interval], * where the interval excludes 0. Each cell is the layer with the "
        "best validation ROC-AUC (layers.md)."
    )
    for number, metrics in zip(("4_1", "4_2"), TABLES):
        title = " / ".join(METRIC_TITLES[m] for m in metrics)
        table = markdown(cells, metrics, models, tasks, source)
        text = f"# Table {number.replace('_', '.')}: {title}\n\n{note}\n\n{table}\n"
        for suffix, content in ((".md", text), (".csv", csv_rows(cells, metrics, models, tasks))):
            path = out_dir / f"table_{number}{suffix}"
            write_atomically(path, lambda handle, content=content: handle.write(content.encode()))
            written.append(path)
    header = ["model"] + [TASK_TITLES.get(t, t) for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for model in models:
        lines.append(
            "| "
            + " | ".join(
                [model]
                + [str(cells[(model, t)]["run"]["layer"]) if (model, t) in cells else "-" for t in tasks]
            )
            + " |"
        )
    text = "# Layer of each table cell (best validation ROC-AUC)\n\n" + "\n".join(lines) + "\n"
    path = out_dir / "layers.md"
    write_atomically(path, lambda handle: handle.write(text.encode()))
    return [*written, path]
