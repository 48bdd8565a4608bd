"""The experiment's table files: Tables 4.1 (ROC-AUC, AP) and 4.2 (micro/macro-F1) as markdown
and CSV, and the layer of each cell (thesis 4.1), drawn by `culturemert.probing.tables` from the
cells of `culturemert.probing.runs.table_cells`; Table 4.1 per tag group from those of
`culturemert.probing.tag_groups.group_cells`."""

from __future__ import annotations

from pathlib import Path

from culturemert.files import write_atomically
from culturemert.probing.runs import METRIC_TITLES, TABLES, Key
from culturemert.probing.tables import csv_rows, layers_markdown, markdown, note


def _write(path: Path, text: str) -> Path:
    write_atomically(path, lambda handle: handle.write(text.encode()))
    return path


def write_tables(
    cells: dict[Key, dict],
    baseline: str,
    models: list[str],
    tasks: list[str],
    source: set[str],
    out_dir: Path,
) -> list[Path]:
    """table_4_1.{md,csv}, table_4_2.{md,csv} and layers.md into `out_dir`, rows `models` and
    columns `tasks` in that order."""
    written = []
    text_note = note(cells, baseline, "layers.md")
    for number, metrics in zip(("4_1", "4_2"), TABLES):
        title = " / ".join(METRIC_TITLES[m] for m in metrics)
        table = markdown(cells, metrics, models, tasks, source)
        text = f"# Table {number.replace('_', '.')}: {title}\n\n{text_note}\n\n{table}\n"
        written.append(_write(out_dir / f"table_{number}.md", text))
        written.append(_write(out_dir / f"table_{number}.csv", csv_rows(cells, metrics, models, tasks)))
    layers = layers_markdown(cells, models, tasks)
    text = f"# Layer of each table cell (best validation ROC-AUC)\n\n{layers}\n"
    return [*written, _write(out_dir / "layers.md", text)]


def write_group_table(
    groups: dict[Key, dict], baseline: str, models: list[str], labels: list[str], out_dir: Path
) -> list[Path]:
    """table_4_1_groups.{md,csv} into `out_dir`: Table 4.1 with a column per tag group (`labels`,
    ``task/group``, in that order) and no averages."""
    metrics = TABLES[0]
    table = markdown(groups, metrics, models, labels, set(), averaged=False)
    text_note = note(groups, baseline, "the whole task's, in layers.md")
    text = (
        "# Table 4.1 per tag group: ROC-AUC / AP over each group's tags (`group=value`)\n\n"
        f"{text_note}\n\n{table}\n"
    )
    return [
        _write(out_dir / "table_4_1_groups.md", text),
        _write(out_dir / "table_4_1_groups.csv", csv_rows(groups, metrics, models, labels)),
    ]
