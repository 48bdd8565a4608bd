"""Training curves of a CPT run from fairseq's logs (thesis Figs 4.9-4.11).

fairseq's ``simple`` log format writes one ``[train_inner]`` line per ``log_interval`` updates in
``<run>/stage<n>/hydra/hydra_train.log``: ``epoch 001:  3 / 9 loss=..., loss_cb0=..., ...,
num_updates=3, lr=..., gnorm=...``. A resumed stage appends to the same log and repeats updates;
the last line of an update wins.
"""

from __future__ import annotations

import re
from pathlib import Path

INNER = re.compile(r"\]\[train_inner\]\[INFO\] - epoch \d+:\s+\d+ / \d+ (.*)$")
FIELD = re.compile(r"(\w+)=([-+0-9.eE]+|nan|inf)")


def stage_curves(log: Path) -> dict[str, list[float]]:
    """Every numeric field of the ``train_inner`` lines of one stage's log, by update:
    {"num_updates": [...], "loss": [...], "loss_cb0": [...], "gnorm": [...], ...}."""
    by_update: dict[int, dict[str, float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = INNER.search(line)
        if match:
            values = {key: float(value) for key, value in FIELD.findall(match[1])}
            if "num_updates" in values:
                by_update[int(values["num_updates"])] = values
    updates = sorted(by_update)
    keys = sorted({key for values in by_update.values() for key in values})
    return {key: [by_update[update].get(key, float("nan")) for update in updates] for key in keys}


def run_curves(run_folder: Path) -> dict[str, dict[str, list[float]]]:
    """The curves of each stage of a run folder that has a log: {"stage1": {...}, ...}."""
    curves = {}
    for stage in sorted(run_folder.glob("stage*")):
        log = stage / "hydra" / "hydra_train.log"
        if log.is_file():
            curves[stage.name] = stage_curves(log)
    return curves
