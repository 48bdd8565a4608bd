"""The console summary of an experiment: Table 4.1's ROC-AUC as plain text (thesis 4.1), and
what it resolves.

`console_table`: one row per model in the table's order (the baseline first), one column per
task: the mean test ROC-AUC over seeds in percent and, for the other models, the paired
difference to the baseline with its 95 % bootstrap interval, ``*`` where the interval excludes
0; then the mean over the source (Western) tasks and over the target tasks, named apart.

`resolved_effects`: the method's effects read off those differences, one line each, with how
many of their cells the intervals resolve: the gate (the baseline beats the untrained start),
more training alone (runs on source audio only), adaptation (each run on its own target tasks)
and forgetting (runs with targets, on the source tasks). Both read ``table_4_1.csv``, or with
``grouped`` its columns per tag group, ``table_4_1_groups.csv`` (`culturemert.probing.tag_groups`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from culturemert.experiment.config import Experiment
from culturemert.probing.tag_groups import task_of


def _points(value: str, sign: bool = False) -> str:
    return f"{100 * float(value):{'+' if sign else ''}.1f}"


def _cell(row: dict[str, str]) -> str:
    text = _points(row["mean"])
    if row["difference"]:
        low, high = _points(row["difference_low"], True), _points(row["difference_high"], True)
        mark = "*" if row["significant"] == "True" else ""
        text += f" {_points(row['difference'], True)} [{low}, {high}]{mark}"
    return text


def _roc_auc_rows(table_csv: Path) -> list[dict[str, str]]:
    with open(table_csv, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["metric"] == "roc_auc"]


def console_table(table_csv: Path, baseline: str, source_tasks: set[str], grouped: bool = False) -> str:
    """The summary (module docstring) of the long-form ``table_4_1.csv`` at `table_csv`; with
    `grouped`, of ``table_4_1_groups.csv``, without the averages."""
    rows = _roc_auc_rows(table_csv)
    models = list(dict.fromkeys(row["model"] for row in rows))
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    cells = {(row["model"], row["task"]): row for row in rows}
    groups = [
        ("source avg.", [task for task in tasks if task in source_tasks]),
        ("target avg.", [task for task in tasks if task not in source_tasks]),
    ]
    groups = [(title, members) for title, members in groups if members and not grouped]
    header = ["model", *tasks, *(title for title, _ in groups)]
    lines = [header]
    for model in models:
        line = [model] + [_cell(cells[(model, task)]) if (model, task) in cells else "-" for task in tasks]
        for _, members in groups:
            values = [float(cells[(model, task)]["mean"]) for task in members if (model, task) in cells]
            line.append(f"{100 * sum(values) / len(values):.1f}" if values else "-")
        lines.append(line)
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    title = (
        f"Test ROC-AUC (%){' per tag group' if grouped else ''}, mean over probe seeds; for each model "
        f"but {baseline}: the paired difference to {baseline} and its 95 % bootstrap interval over "
        "test tracks, * where it excludes 0"
    )
    return "\n".join([title, "", *text])


def _effect(title: str, cells: list[tuple[str, dict[str, str]]], sign: int) -> str:
    """``title``, the cells' differences (``*`` where resolved) and how many are resolved in the
    direction ``sign`` (+1: a gain over the baseline, -1: a loss)."""
    listed = ", ".join(
        f"{label} {_points(row['difference'], True)}{'*' if row['significant'] == 'True' else ''}"
        for label, row in cells
    )
    resolved = sum(row["significant"] == "True" and sign * float(row["difference"]) > 0 for _, row in cells)
    return f"- {title}: {listed}: resolved in {resolved} of {len(cells)}"


def resolved_effects(
    table_csv: Path, experiment: Experiment, source_tasks: set[str], grouped: bool = False
) -> str:
    """The effects (module docstring) of ``experiment`` in ``table_4_1.csv`` (`grouped`: in
    ``table_4_1_groups.csv``), against its baseline."""
    rows = {(row["model"], row["task"]): row for row in _roc_auc_rows(table_csv)}
    baseline = experiment.report.baseline or experiment.start.name
    tasks = list(dict.fromkeys(task for _, task in rows))
    source = [task for task in tasks if task_of(task) in source_tasks]

    def cells(model: str, among: list[str], named: bool = False) -> list[tuple[str, dict[str, str]]]:
        """The model's cells on the tasks ``among``, labelled by task (``named``: "model on task")."""
        return [
            (f"{model} on {task}" if named else task, rows[(model, task)])
            for task in among
            if (model, task) in rows
        ]

    lines = [
        f"What the intervals resolve{' per tag group' if grouped else ''} "
        f"(differences to {baseline} in points, * where resolved):"
    ]
    untrained = experiment.start.name
    if untrained != baseline and any(model == untrained for model, _ in rows):
        gate = f"gate, {baseline} above the start model {untrained}"
        lines.append(_effect(gate, cells(untrained, tasks), -1))
    adaptation, forgetting = [], []
    for run in experiment.runs:
        if run.name == baseline:
            continue
        targets = [task for task in tasks if task_of(task) in run.cultures and task not in source]
        if not targets:
            control = f"more training alone ({run.name}, on source audio)"
            if cells(run.name, tasks):  # a run the table has
                lines.append(_effect(control, cells(run.name, tasks), +1))
            continue
        adaptation += cells(run.name, targets, named=True)
        forgetting += cells(run.name, source, named=True)
    if adaptation:
        lines.append(_effect("adaptation, each run on its own target", adaptation, +1))
    if forgetting:
        lines.append(_effect("forgetting, the adapted runs on the source tasks (a loss)", forgetting, -1))
    return "\n".join(lines)
