"""The experiment's table files: Tables 4.1 (ROC-AUC, AP) and 4.2 (micro/macro-F1) as markdown
and CSV, and the layer of each cell (thesis 4.1), drawn by `culturemert.probing.tables` from the
cells of `culturemert.probing.runs.table_cells`."""

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
