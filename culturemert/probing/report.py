"""The report of ``probe.py report`` over probe runs (thesis Tables 4.1/4.2, Figures 4.2, 4.4
and 4.7), drawn with the same cells, tables and figures as the experiment's report
(`culturemert.probing.runs`, `.tables`, `.figures`).

Models are told apart by content (`runs.name_by_content`): runs of one checkpoint under
different names are one row, and models that share a name are told apart by a short hash. The
base model comes first, then the others as first seen; tasks follow the thesis's order, and the
Western tasks (MTAT, FMA) are averaged apart from the target cultures. Intervals come from the
runs' saved test predictions (a run without them is shown without, and the note says so).

- ``table.md``: Table 4.1 (ROC-AUC, AP), Table 4.2 (micro-, macro-F1), Table 4.1 per tag group
  where tags are named ``group=value`` (`culturemert.probing.tag_groups`) and the layer of each cell;
- ``layerwise_roc_auc.png``: test ROC-AUC per layer, a panel per task, a line per model, the
  weighted sum of all layers as a dashed level (Figure 4.7);
- ``transfer.png``: each model's ROC-AUC minus the base model's, per task (Figure 4.2);
- ``lambda_sweep.png``: ROC-AUC against the merging coefficient of models named like
  ``lambda_0.2``, a panel per task, the base model dotted (Figure 4.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from culturemert.files import write_atomically
from culturemert.probing.bootstrap import RESAMPLES
from culturemert.probing.figures import lambda_sweep, layerwise, transfer_matrix
from culturemert.probing.runs import (
    METRIC_TITLES,
    TABLES,
    WESTERN_TASKS,
    Key,
    PathLike,
    ReportError,
    lambda_of,
    load_runs,
    name_by_content,
    ordered,
    table_cells,
)
from culturemert.probing.tables import layers_markdown, markdown, note, ordered_models, ordered_tasks
from culturemert.probing.tag_groups import group_cells, group_columns
from culturemert.probing.tasks import BUILTIN_TASKS


def _cells(
    runs: list[dict], base: str, resamples: int, seed: int
) -> tuple[dict[Key, dict], list[str], list[str]]:
    """The table cells of `runs` against `base`, the models in row order and the tasks in
    column order."""
    cells = table_cells(runs, base, resamples, seed)
    models = ordered_models(cells, base, ordered([run["model"] for run in runs]))
    tasks = ordered_tasks(cells, ordered([run["task"] for run in runs], BUILTIN_TASKS))
    return cells, models, tasks


def _text(
    cells: dict[Key, dict], models: list[str], tasks: list[str], base: str, resamples: int, seed: int
) -> str:
    sections = [note(cells, base, "last table")]
    for number, metrics in zip(("4.1", "4.2"), TABLES):
        title = " / ".join(METRIC_TITLES[m] for m in metrics)
        table = markdown(cells, metrics, models, tasks, WESTERN_TASKS)
        sections.append(f"### Table {number}: {title}\n\n{table}")
    groups = group_cells(cells, base, resamples, seed)
    if groups:
        table = markdown(groups, TABLES[0], models, group_columns(groups, tasks), set(), averaged=False)
        sections.append(
            f"### Table 4.1 per tag group (tags named `group=value`; the whole task's layer)\n\n{table}"
        )
    layers = layers_markdown(cells, models, tasks)
    sections.append(f"### Layer of each cell (best validation ROC-AUC)\n\n{layers}")
    return "\n\n".join(sections) + "\n"


def markdown_tables(
    runs: list[dict], base: str | None = None, resamples: int = RESAMPLES, seed: int = 0
) -> str:
    """The text of table.md for `runs` (module docstring); `base` defaults to the first run's model."""
    base = base or runs[0]["model"]
    return _text(*_cells(runs, base, resamples, seed), base, resamples, seed)


def write_report(
    paths: Sequence[PathLike], out_dir: PathLike, base: str | None = None, resamples: int = RESAMPLES
) -> dict[str, Path]:
    """Write table.md and the figures of the runs under `paths` into `out_dir` (module
    docstring). `base` defaults to the model of the first run. Returns what was written by name;
    a figure the runs cannot support is left out."""
    runs = name_by_content(load_runs(paths))
    if not runs:
        raise ReportError(f"no results.json under {', '.join(map(str, paths))}")
    base = base or runs[0]["model"]
    if base not in {run["model"] for run in runs}:
        models = ordered([run["model"] for run in runs])
        raise ReportError(f"base model {base!r} has no run; models: {', '.join(models)}")
    cells, models, tasks = _cells(runs, base, resamples, seed=0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "table.md"
    text = _text(cells, models, tasks, base, resamples, 0)
    write_atomically(table, lambda handle: handle.write(text.encode()))
    sweep = [model for model in models if lambda_of(model) is not None]
    figures = {
        "layerwise": layerwise(runs, models, tasks, out_dir / "layerwise_roc_auc.png"),
        "transfer": transfer_matrix(cells, base, models, tasks, out_dir / "transfer.png"),
        "lambda_sweep": lambda_sweep(cells, sweep, base, tasks, out_dir / "lambda_sweep.png"),
    }
    return {"table": table} | {name: path for name, path in figures.items() if path is not None}
