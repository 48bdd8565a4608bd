"""Tables and plots over probe runs (thesis Tables 4.1/4.2, Figures 4.2, 4.4 and 4.7).

A run is a folder with the ``results.json`` of `probe.fit_probe`, which names its model, task and
layer. A model is identified by its content (the sha256 recorded at extraction), not its name:
runs of one checkpoint under different names are one row, and models that share a name (two
``hf`` folders of different runs) are told apart by a short hash after the name.

Where a model has several runs on a task (one per layer, say), the tables and the transfer
and lambda plots use the run with the best mean *validation* ROC-AUC; the test split chooses
nothing. Scores are shown in percent, mean ± sample std over seeds.

- ``table.md``: models x tasks, ROC-AUC and AP (Table 4.1), micro- and macro-F1 (Table 4.2), each
  with an "Avg." column over the cells present, and the layer each cell comes from;
- ``layerwise_roc_auc.png``: test ROC-AUC per layer, one panel per task, one line per model, a
  weighted-sum ("all") run as a dashed level (Figure 4.7);
- ``transfer.png``: each model's ROC-AUC minus the base model's, per task (Figure 4.2);
- ``lambda_sweep.png``: ROC-AUC against the merging coefficient of models named like
  ``lambda_0.2``, one line per task, the base model dotted (Figure 4.4).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from culturemert.errors import UserError
from culturemert.probing.probe import ALL_LAYERS
from culturemert.probing.tasks import BUILTIN_TASKS

TASK_TITLES = {
    "makam": "Turkish-makam",
    "hindustani": "Hindustani",
    "carnatic": "Carnatic",
    "lyra": "Lyra",
    "fma": "FMA-medium",
    "magnatagatune": "MTAT",
}
METRIC_TITLES = {"roc_auc": "ROC-AUC", "ap": "AP", "micro_f1": "Micro-F1", "macro_f1": "Macro-F1"}
TABLES = (("roc_auc", "ap"), ("micro_f1", "macro_f1"))
LAMBDA_NAME = re.compile(r"lambda[_=-]?(\d+(?:\.\d+)?)", re.IGNORECASE)

PathLike = str | os.PathLike
Key = tuple[str, str]  # (model, task)


class ReportError(UserError):
    """Runs that cannot be reported; the message names the files."""


def load_runs(paths: Sequence[PathLike]) -> list[dict]:
    """The results of every run folder in `paths`, or of every results.json below a folder that is
    not one itself."""
    files = []
    for path in map(Path, paths):
        if (path / "results.json").is_file():
            files.append(path / "results.json")
        elif path.is_dir():
            files.extend(sorted(path.rglob("results.json")))
        else:
            raise ReportError(f"{path}: not a probe run folder (no results.json)")
    if not files:
        raise ReportError(f"no results.json under {', '.join(map(str, paths))}")
    return _name_by_content([json.loads(file.read_text()) for file in files])


def _name_by_content(runs: list[dict]) -> list[dict]:
    """The runs with ``model`` set to one name per model content (``model_sha256``; runs without
    it are identified by name): the first name seen, followed by the hash's first 8 digits where
    models of different content share it."""
    first_name: dict[str, str] = {}
    for run in runs:
        first_name.setdefault(run.get("model_sha256") or run["model"], run["model"])
    contents: dict[str, set[str]] = {}
    for identity, name in first_name.items():
        contents.setdefault(name, set()).add(identity)
    renamed = []
    for run in runs:
        identity = run.get("model_sha256") or run["model"]
        name = first_name[identity]
        if len(contents[name]) > 1:
            name = f"{name} ({identity[:8]})"
        renamed.append({**run, "model": name})
    return renamed


def _ordered(values: Sequence[str], order: Sequence[str] = ()) -> list[str]:
    """Distinct `values`: those listed in `order` first, in that order, then the rest as first seen."""
    distinct = list(dict.fromkeys(values))
    return [value for value in order if value in distinct] + [
        value for value in distinct if value not in order
    ]


def best_runs(runs: list[dict]) -> dict[Key, dict]:
    """The run of each (model, task) with the best mean validation ROC-AUC."""
    best: dict[Key, dict] = {}
    for run in runs:
        key = (run["model"], run["task"])
        if key not in best or run["mean"]["valid_roc_auc"] > best[key]["mean"]["valid_roc_auc"]:
            best[key] = run
    return best


def _cell(run: dict | None, metric: str) -> str:
    if run is None:
        return "-"
    return f"{100 * run['mean'][metric]:.1f} ± {100 * run['std'][metric]:.1f}"


def markdown_tables(runs: list[dict]) -> str:
    """Tables 4.1/4.2-style markdown of the best run per (model, task), and the layers used."""
    best = best_runs(runs)
    models = _ordered([run["model"] for run in runs])
    tasks = _ordered([run["task"] for run in runs], BUILTIN_TASKS)
    sections = []
    for metrics in TABLES:
        header = ["model"] + [
            f"{TASK_TITLES.get(task, task)} {METRIC_TITLES[m]}" for task in tasks for m in metrics
        ]
        lines = ["| " + " | ".join([*header, "Avg."]) + " |", "|" + " --- |" * (len(header) + 1)]
        for model in models:
            present = [
                best[(model, task)]["mean"][m] for task in tasks if (model, task) in best for m in metrics
            ]
            cells = [_cell(best.get((model, task)), m) for task in tasks for m in metrics]
            average = f"{100 * np.mean(present):.1f}" if present else "-"
            lines.append("| " + " | ".join([model, *cells, average]) + " |")
        title = " / ".join(METRIC_TITLES[m] for m in metrics)
        sections.append(f"### {title} (%, mean ± std over seeds)\n\n" + "\n".join(lines))
    header = ["model"] + [TASK_TITLES.get(task, task) for task in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for model in models:
        layers = [str(best[(model, task)]["layer"]) if (model, task) in best else "-" for task in tasks]
        lines.append("| " + " | ".join([model, *layers]) + " |")
    sections.append("### Layer of each cell (best validation ROC-AUC)\n\n" + "\n".join(lines))
    return "\n\n".join(sections) + "\n"


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


def plot_layerwise(runs: list[dict], out_path: PathLike) -> Path | None:
    """Test ROC-AUC against the layer (module docstring); None when no task has runs of two layers."""
    tasks = _ordered([run["task"] for run in runs], BUILTIN_TASKS)
    tasks = [
        t for t in tasks if len({r["layer"] for r in runs if r["task"] == t and r["layer"] != ALL_LAYERS}) > 1
    ]
    if not tasks:
        return None
    models = _ordered([run["model"] for run in runs])
    figure, axes, _ = panels(len(tasks), (4.8, 3.6))
    for axis, task in zip(axes, tasks):
        for color, model in enumerate(models):
            by_layer = {run["layer"]: run for run in runs if run["task"] == task and run["model"] == model}
            layers = sorted(layer for layer in by_layer if layer != ALL_LAYERS)
            means = [100 * by_layer[layer]["mean"]["roc_auc"] for layer in layers]
            stds = [100 * by_layer[layer]["std"]["roc_auc"] for layer in layers]
            if layers:
                axis.errorbar(layers, means, yerr=stds, marker="o", capsize=2, color=f"C{color}", label=model)
            if ALL_LAYERS in by_layer:
                axis.axhline(100 * by_layer[ALL_LAYERS]["mean"]["roc_auc"], color=f"C{color}", linestyle="--")
        axis.set_title(TASK_TITLES.get(task, task))
        axis.set_xlabel("layer (dashed: weighted sum of all)")
        axis.set_ylabel("test ROC-AUC (%)")
        axis.legend(fontsize="small")
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=120)
    return out_path


def plot_transfer(runs: list[dict], base: str, out_path: PathLike) -> Path | None:
    """ROC-AUC of each model minus the base model's, per task; None without another model."""
    best = best_runs(runs)
    tasks = [task for task in _ordered([run["task"] for run in runs], BUILTIN_TASKS) if (base, task) in best]
    models = [model for model in _ordered([run["model"] for run in runs]) if model != base]
    if not tasks or not models:
        return None
    figure = Figure(figsize=(1.6 + 1.2 * len(tasks) * max(1, len(models) / 3), 3.8), layout="constrained")
    axis = figure.subplots()
    width = 0.8 / len(models)
    for index, model in enumerate(models):
        deltas = [
            100 * (best[(model, task)]["mean"]["roc_auc"] - best[(base, task)]["mean"]["roc_auc"])
            if (model, task) in best
            else np.nan
            for task in tasks
        ]
        positions = np.arange(len(tasks)) - 0.4 + width * (index + 0.5)
        axis.bar(positions, deltas, width, label=model, color=f"C{index}")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(np.arange(len(tasks)), [TASK_TITLES.get(task, task) for task in tasks])
    axis.set_ylabel(f"ROC-AUC relative to {base} (points)")
    axis.legend(fontsize="small")
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=120)
    return out_path


def lambda_of(model: str) -> float | None:
    """The merging coefficient in a model name such as ``lambda_0.2``, or None."""
    match = LAMBDA_NAME.search(model)
    return float(match[1]) if match else None


def plot_lambda_sweep(runs: list[dict], out_path: PathLike, base: str | None = None) -> Path | None:
    """ROC-AUC against lambda, one line per task (module docstring); None with under two lambdas."""
    best = best_runs(runs)
    lambdas = {model: lambda_of(model) for model, _ in best if lambda_of(model) is not None}
    if len(set(lambdas.values())) < 2:
        return None
    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    tasks = _ordered([task for model, task in best if model in lambdas], BUILTIN_TASKS)
    for color, task in enumerate(tasks):
        points = sorted(
            (lambdas[model], 100 * best[(model, task)]["mean"]["roc_auc"])
            for model in lambdas
            if (model, task) in best
        )
        axis.plot(*zip(*points), marker="o", color=f"C{color}", label=TASK_TITLES.get(task, task))
        if base is not None and (base, task) in best:
            axis.axhline(100 * best[(base, task)]["mean"]["roc_auc"], color=f"C{color}", linestyle=":")
    axis.set_xlabel("lambda" + (f" (dotted: {base})" if base else ""))
    axis.set_ylabel("test ROC-AUC (%)")
    axis.legend(fontsize="small")
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=120)
    return out_path


def write_report(paths: Sequence[PathLike], out_dir: PathLike, base: str | None = None) -> dict[str, Path]:
    """Write table.md and the plots of the runs under `paths` into `out_dir` (module docstring).
    `base` defaults to the model of the first run. Returns what was written by name; a plot the
    runs cannot support is left out."""
    runs = load_runs(paths)
    base = base or runs[0]["model"]
    if base not in {run["model"] for run in runs}:
        raise ReportError(
            f"base model {base!r} has no run; models: {', '.join(_ordered([r['model'] for r in runs]))}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "table.md"
    table.write_text(markdown_tables(runs))
    written = {"table": table}
    plots = {
        "layerwise": plot_layerwise(runs, out_dir / "layerwise_roc_auc.png"),
        "transfer": plot_transfer(runs, base, out_dir / "transfer.png"),
        "lambda_sweep": plot_lambda_sweep(runs, out_dir / "lambda_sweep.png", base),
    }
    written.update({name: path for name, path in plots.items() if path is not None})
    return written
