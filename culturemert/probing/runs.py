"""Probe runs as the reports see them: finding them, telling models apart, the run of each table
cell and its scores with their uncertainty (thesis Tables 4.1/4.2, 3.5.2).

A run is a folder with the ``results.json`` of `probe.fit_probe`, which names its model, task and
layer, and usually the ``predictions.npz`` of its test split. Where a model has several runs on a
task (one per layer, say), a cell uses the run with the best mean *validation* ROC-AUC; the test
split chooses nothing. A cell's scores are the mean ± std over seeds, with the 95 % bootstrap
interval over test recordings (`culturemert.probing.bootstrap`) and, for every model but the
baseline, the paired difference to the baseline's cell; without saved predictions a cell has its
mean ± std and the difference of the means only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from culturemert.errors import UserError
from culturemert.probing.bootstrap import RESAMPLES, Predictions, bootstrap_cell
from culturemert.probing.metrics import METRICS

TASK_TITLES = {
    "makam": "Turkish-makam",
    "hindustani": "Hindustani",
    "carnatic": "Carnatic",
    "lyra": "Lyra",
    "fma": "FMA-medium",
    "magnatagatune": "MTAT",
}
WESTERN_TASKS = frozenset({"fma", "magnatagatune"})  # the source domain, averaged apart (thesis 4.1)
METRIC_TITLES = {"roc_auc": "ROC-AUC", "ap": "AP", "micro_f1": "Micro-F1", "macro_f1": "Macro-F1"}
TABLES = (("roc_auc", "ap"), ("micro_f1", "macro_f1"))  # Table 4.1, Table 4.2
LAMBDA_NAME = re.compile(r"lambda[_=-]?(\d+(?:\.\d+)?)", re.IGNORECASE)

PathLike = str | os.PathLike
Key = tuple[str, str]  # (model, task)


class ReportError(UserError):
    """Runs that cannot be reported; the message names the files."""


def load_runs(paths: Sequence[PathLike]) -> list[dict]:
    """The results of every run folder in `paths`, or of every results.json below a folder that
    is not one itself, each with its folder as ``run_dir``; a path that is neither is refused."""
    files = []
    for path in map(Path, paths):
        if (path / "results.json").is_file():
            files.append(path / "results.json")
        elif path.is_dir():
            files.extend(sorted(path.rglob("results.json")))
        else:
            raise ReportError(f"{path}: not a probe run folder (no results.json)")
    return [{**json.loads(file.read_text()), "run_dir": str(file.parent)} for file in files]


def name_by_content(runs: list[dict]) -> list[dict]:
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


def ordered(values: Sequence[str], order: Sequence[str] = ()) -> list[str]:
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


def lambda_of(model: str) -> float | None:
    """The merging coefficient in a model name such as ``lambda_0.2``, or None."""
    match = LAMBDA_NAME.search(model)
    return float(match[1]) if match else None


def predictions_of(run: dict) -> Predictions | None:
    """The run's saved test predictions, or None where its folder has none."""
    if "run_dir" not in run:
        return None
    path = Path(run["run_dir"]) / "predictions.npz"
    return Predictions.load(path) if path.is_file() else None


def table_cells(
    runs: list[dict], baseline: str, resamples: int = RESAMPLES, seed: int = 0
) -> dict[Key, dict]:
    """Per (model, task): ``run`` (the best run) and ``metrics``, per metric the ``mean`` and
    ``std`` over seeds; with predictions, the ``interval`` of `bootstrap_cell`; for a model other
    than `baseline` on a task the baseline has, the ``difference`` to it, with its paired
    ``difference_interval`` and ``significant`` where both runs saved predictions."""
    best = best_runs(runs)
    predictions = {key: predictions_of(run) for key, run in best.items()}
    cells = {}
    for (model, task), run in best.items():
        own = predictions[(model, task)]
        base_run = best.get((baseline, task)) if model != baseline else None
        base = predictions[(baseline, task)] if base_run is not None else None
        if own is None:
            metrics = {m: {"mean": run["mean"][m], "std": run["std"][m]} for m in METRICS}
        else:
            metrics = bootstrap_cell(own, base, resamples, seed, f"{model} vs {baseline} on {task}")
        if base_run is not None and (own is None or base is None):
            for metric in METRICS:
                metrics[metric]["difference"] = run["mean"][metric] - base_run["mean"][metric]
        cells[(model, task)] = {"run": run, "metrics": metrics}
    return cells
