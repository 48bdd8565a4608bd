"""probe.py report: the table and figures come from the experiment's functions, with bootstrap
intervals where the runs saved their test predictions and plain means where they did not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from culturemert.cli.probe import main
from culturemert.probing.bootstrap import Predictions, bootstrap_cell
from culturemert.probing.metrics import tagging_metrics

RESAMPLES = 200


def write_run(
    folder: Path,
    model: str,
    strength: float,
    layer: int,
    predictions: bool = True,
    tags: list[str] | None = None,
) -> None:
    """A probe run folder as `probe.write_run` leaves it: results.json (scikit-learn's metrics of
    two seeds' scores, and the names of the 3 tags if given) and, if `predictions`, predictions.npz."""
    rng = np.random.default_rng(int(strength * 100) + layer)
    y_true = np.random.default_rng(0).random((40, 3)) < 0.4  # the same test split for every run
    noise = rng.normal(0, 1.0, (2, *y_true.shape))
    scores = 1 / (1 + np.exp(-(strength * (2 * y_true - 1) + noise)))
    per_seed = [tagging_metrics(y_true, seed_scores) for seed_scores in scores]
    mean = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]}
    std = {k: float(np.std([s[k] for s in per_seed], ddof=1)) for k in per_seed[0]}
    mean["valid_roc_auc"], std["valid_roc_auc"] = 0.5 + 0.1 * layer, 0.0  # the last layer is chosen
    folder.mkdir(parents=True)
    results = {"model": model, "task": "lyra", "layer": layer, "mean": mean, "std": std}
    if tags is not None:
        results["tags"] = tags
    (folder / "results.json").write_text(json.dumps(results))
    if predictions:
        ids = np.array([f"track{i}" for i in range(len(y_true))])
        np.savez(folder / "predictions.npz", ids=ids, y_true=y_true.astype(np.uint8), scores=scores)


def report(runs: Path, out: Path) -> str:
    args = ["report", str(runs), "--out", str(out), "--base", "base", "--resamples", str(RESAMPLES)]
    assert main(args) == 0
    for name in ("table.md", "transfer.png"):
        assert (out / name).stat().st_size > 0
    return (out / "table.md").read_text()


def percent(value: float, sign: str = "") -> str:
    return f"{100 * value:{sign}.1f}"


def test_report_cells_carry_the_bootstrap_of_the_saved_predictions(tmp_path):
    for model, strength in (("base", 0.5), ("adapted", 1.5)):
        for layer in (0, 1):
            write_run(tmp_path / "runs" / model / str(layer), model, strength, layer)
    table = report(tmp_path / "runs", tmp_path / "report")
    assert (tmp_path / "report" / "layerwise_roc_auc.png").stat().st_size > 0

    base = Predictions.load(tmp_path / "runs" / "base" / "1")
    adapted = Predictions.load(tmp_path / "runs" / "adapted" / "1")
    expected = bootstrap_cell(adapted, base, RESAMPLES, 0)["roc_auc"]
    low, high = expected["interval"]
    d_low, d_high = expected["difference_interval"]
    mark = "*" if expected["significant"] else ""
    cell = (
        f"{percent(expected['mean'])} ± {percent(expected['std'])} [{percent(low)}, {percent(high)}]"
        f"<br>Δ {percent(expected['difference'], '+')} [{percent(d_low, '+')}, {percent(d_high, '+')}]{mark}"
    )
    assert f"| adapted | {cell} |" in table
    assert "[95 % bootstrap interval over test tracks]" in table
    assert table.index("| base |") < table.index("| adapted |")  # the baseline first
    results = json.loads((tmp_path / "runs" / "adapted" / "1" / "results.json").read_text())
    assert expected["mean"] == pytest.approx(results["mean"]["roc_auc"])  # the cell is the chosen run


def test_runs_without_predictions_are_reported_without_intervals_and_the_note_says_so(tmp_path):
    write_run(tmp_path / "runs" / "base", "base", 0.5, 1, predictions=False)
    write_run(tmp_path / "runs" / "adapted", "adapted", 1.5, 1, predictions=False)
    table = report(tmp_path / "runs", tmp_path / "report")

    base, adapted = (
        json.loads((tmp_path / "runs" / name / "results.json").read_text())["mean"]["roc_auc"]
        for name in ("base", "adapted")
    )
    assert f"<br>Δ {percent(adapted - base, '+')} |" in table  # the difference of the means, no interval
    assert "no bootstrap intervals" in table and "[" not in table.split("### Table 4.2")[0]

    # predictions for one run only: intervals where there are predictions; the note names the other
    write_run(tmp_path / "mixed" / "base", "base", 0.5, 1, predictions=False)
    write_run(tmp_path / "mixed" / "adapted", "adapted", 1.5, 1)
    table = report(tmp_path / "mixed", tmp_path / "mixed_report")
    assert "no interval for base on lyra" in table
    assert "| base | " + f"{percent(base)} ± " in table
    adapted_row = next(line for line in table.splitlines() if line.startswith("| adapted |"))
    assert adapted_row.count("[") == 2  # ROC-AUC and AP intervals; the difference has none


def test_tags_named_group_value_get_a_column_per_group(tmp_path):
    """The group's cell is the macro ROC-AUC over its own tags (scikit-learn's, mean of the seeds)
    of the run the whole task's cell uses, with the paired bootstrap on those tags."""
    tags = ["mode=major", "key=C", "key=D"]
    for model, strength in (("base", 0.5), ("adapted", 1.5)):
        for layer in (0, 1):
            write_run(tmp_path / "runs" / model / str(layer), model, strength, layer, tags=tags)
    table = report(tmp_path / "runs", tmp_path / "report")
    groups = table.split("### Table 4.1 per tag group")[1].split("###")[0]
    assert "| model | lyra/mode ROC-AUC | lyra/mode AP | lyra/key ROC-AUC | lyra/key AP |" in groups

    base = Predictions.load(tmp_path / "runs" / "base" / "1")
    adapted = Predictions.load(tmp_path / "runs" / "adapted" / "1")
    key = [1, 2]
    by_sklearn = np.mean([roc_auc_score(adapted.y_true[:, key], s[:, key]) for s in adapted.scores])
    expected = bootstrap_cell(adapted.columns(key), base.columns(key), RESAMPLES, 0)["roc_auc"]
    assert expected["mean"] == pytest.approx(by_sklearn)
    d_low, d_high = expected["difference_interval"]
    difference = f"Δ {percent(expected['difference'], '+')} [{percent(d_low, '+')}, {percent(d_high, '+')}]"
    adapted_row = next(line for line in groups.splitlines() if line.startswith("| adapted |"))
    assert adapted_row.split(" | ")[3].startswith(f"{percent(by_sklearn)} ± ")  # lyra/key ROC-AUC
    assert difference in adapted_row.split(" | ")[3]
