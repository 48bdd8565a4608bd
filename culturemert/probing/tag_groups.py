"""Scores per tag group: a task's tags named ``group=value`` (``key=C``, ``tuning=neutral``)
scored group by group, so that a change in one attribute (the tuning of a target culture, 3 tags)
is not hidden in the macro average by another (the key, 12 tags of 15).

A group's metrics are those of `bootstrap.bootstrap_cell` on the group's tags alone: the macro
average over them, its 95 % bootstrap interval over the test recordings and the paired difference
to the baseline's same run, from the predictions of the run the whole task's cell uses (the
layer chosen on validation for the whole task). A group cell is keyed ``(model, "task/group")``:
task names are folder names, so the task is the label before its first ``/``.
"""

from __future__ import annotations

from collections.abc import Sequence

from culturemert.probing.bootstrap import RESAMPLES, bootstrap_cell
from culturemert.probing.metrics import evaluable_tags
from culturemert.probing.runs import Key, predictions_of

SEPARATOR = "="


def tag_groups(tags: Sequence[str]) -> dict[str, list[int]]:
    """The column of each tag by group, groups in first-seen order; empty unless every tag is
    named ``group=value`` and there are two groups or more (one group is the whole task)."""
    groups: dict[str, list[int]] = {}
    for column, tag in enumerate(tags):
        group, separator, _ = tag.partition(SEPARATOR)
        if not separator:
            return {}
        groups.setdefault(group, []).append(column)
    return groups if len(groups) > 1 else {}


def group_label(task: str, group: str) -> str:
    """The task column of a group cell."""
    return f"{task}/{group}"


def task_of(label: str) -> str:
    """The task of a column label, a task's own name or a `group_label`."""
    return label.split("/", 1)[0]


def group_cells(
    cells: dict[Key, dict], baseline: str, resamples: int = RESAMPLES, seed: int = 0
) -> dict[Key, dict]:
    """Per group of each cell of `runs.table_cells` whose run saved its predictions and has tag
    groups: ``run`` and ``metrics`` as in a table cell, keyed by `group_label`, with the paired
    difference to `baseline`'s cell on the same task where it saved predictions too. A group none
    of whose tags has a positive and a negative test recording has no cell."""
    grouped = {}
    for (model, task), cell in cells.items():
        run = cell["run"]
        groups = tag_groups(run.get("tags", ()))
        own = predictions_of(run) if groups else None
        if own is None:
            continue
        base_cell = cells.get((baseline, task)) if model != baseline else None
        base = predictions_of(base_cell["run"]) if base_cell is not None else None
        base_groups = tag_groups(base_cell["run"].get("tags", ())) if base is not None else {}
        scorable = evaluable_tags(own.y_true)
        for group, columns in groups.items():
            if not scorable[columns].any():  # no tag of the group has both classes in the test split
                continue
            label = group_label(task, group)
            metrics = bootstrap_cell(
                own.columns(columns),
                base.columns(base_groups[group]) if group in base_groups else None,
                resamples,
                seed,
                f"{model} vs {baseline} on {label}",
            )
            grouped[(model, label)] = {"run": run, "metrics": metrics}
    return grouped


def group_columns(groups: dict[Key, dict], tasks: Sequence[str]) -> list[str]:
    """The group labels of `groups`, task by task in the order of `tasks`, each task's groups as
    first seen."""
    present = list(dict.fromkeys(label for _, label in groups))
    return [label for task in tasks for label in present if task_of(label) == task]
