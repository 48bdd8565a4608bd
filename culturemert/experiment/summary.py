"""The console summary of an experiment: Table 4.1's ROC-AUC as plain text (thesis 4.1).

One row per model in the table's order (the baseline first), one column per task: the mean test
ROC-AUC over seeds in percent and, for the other models, the paired difference to the baseline
with its 95 % bootstrap interval, ``*`` where the interval excludes 0; then the mean over the
source (Western) tasks and over the target tasks, named apart. Read from ``table_4_1.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path


def _points(value: str, sign: bool = False) -> str:
    return f"{100 * float(value):{'+' if sign else ''}.1f}"


def _cell(row: dict[str, str]) -> str:
    text = _points(row["mean"])
    if row["difference"]:
        low, high = _points(row["difference_low"], True), _points(row["difference_high"], True)
        mark = "*" if row["significant"] == "True" else ""
        text += f" {_points(row['difference'], True)} [{low}, {high}]{mark}"
    return text


def console_table(table_csv: Path, baseline: str, source_tasks: set[str]) -> str:
    """The summary (module docstring) of the long-form ``table_4_1.csv`` at `table_csv`."""
    with open(table_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["metric"] == "roc_auc"]
    models = list(dict.fromkeys(row["model"] for row in rows))
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    cells = {(row["model"], row["task"]): row for row in rows}
    groups = [
        ("source avg.", [task for task in tasks if task in source_tasks]),
        ("target avg.", [task for task in tasks if task not in source_tasks]),
    ]
    groups = [(title, members) for title, members in groups if members]
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
        f"Test ROC-AUC (%), mean over probe seeds; for each model but {baseline}: the paired difference "
        f"to {baseline} and its 95 % bootstrap interval over test tracks, * where it excludes 0"
    )
    return "\n".join([title, "", *text])
