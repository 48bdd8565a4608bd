"""The experiment driver end to end on rendered music: every table and figure, resumption after
a SIGKILL, numbers equal to scikit-learn on the saved predictions, and skipping what is done."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from culturemert.cli.experiment import main
from culturemert.experiment.config import ExperimentError, load_experiment
from culturemert.experiment.logs import stage_curves
from culturemert.experiment.plan import run_folder
from culturemert.experiment.summary import resolved_effects

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "experiments" / "demo.yaml"
FIGURES = [
    "fig_4_1_roc_auc.png",
    "fig_4_2_transfer.png",
    "fig_4_3_token_similarity.png",
    "fig_4_4_lambda_sweep.png",
    "fig_4_5_task_vectors.png",
    "fig_4_6_sweep_vs_multi.png",
    "fig_4_7_layerwise.png",
    "fig_4_8_checkpoints.png",
    "fig_4_9_loss.png",
    "fig_4_10_codebook_loss.png",
    "fig_4_11_grad_norm.png",
]
TABLES = ["table_4_1.md", "table_4_1.csv", "table_4_1_groups.md", "table_4_1_groups.csv", "table_4_2.md",
          "table_4_2.csv", "layers.md"]  # fmt: skip


def small_experiment(folder: Path) -> Path:
    """configs/experiments/demo.yaml made smaller: fewer pieces, the two target runs from the
    untrained start with 4 updates of 1 s crops per stage, two layers and their sum, 2 seeds; and
    what the demo leaves out (token similarity, Fig 4.6's multi-culture stand-in, Fig 4.8's
    checkpoints), so that every table and figure is made."""
    config = OmegaConf.load(DEMO)
    config.out = str(folder / "out")
    config.preset = "tiny"
    for domain, collections in {
        "western": {"bach": 8, "palestrina": 4},
        "essen": {"essen": 12},
        "fiddle": {"fiddle": 12},
    }.items():
        config.render.domains[domain].collections = collections
    config.render.split = {"train": 0.5, "valid": 0.25, "test": 0.25}
    config.teacher.from_data_run = "fiddle"
    config.runs = [run for run in config.runs if run.name in ("fiddle", "essen")]
    for run in config.runs:
        run.init = None
        run.overrides = ["optimization.max_update=4"]
    config.runs[1].checkpoint_interval = 2
    config.merges[0].base = None
    config.similarity = {
        "fiddle": "${out}/data/fiddle/tokens/stage2/train",
        "essen": "${out}/data/essen/tokens/stage2/train",
        "essen-valid": "${out}/data/essen/stage2/valid.tsv",  # a manifest: tokens extracted
    }
    config.probing.layers = [1, 2, "all"]
    config.probing.seeds = 2
    config.probing.fit_flags = ["--lrs", "1e-3", "--max-epochs", "8", "--threads", "1", "--standardize"]
    config.report.baseline = "untrained"
    config.report.multi = "essen"  # stands in for the multi-culture model of Fig 4.6
    config.report.resamples = 200
    config.report.checkpoints = {"run": "fiddle", "task": "fiddle", "layer": "all"}
    path = folder / "small.yaml"
    path.write_text(OmegaConf.to_yaml(config))
    return path


def run_driver(
    experiment: Path, *extra: str, kill_after: str | None = None
) -> subprocess.CompletedProcess | None:
    """The real command line; with `kill_after`, SIGKILL the driver and its children once that
    file exists."""
    command = [sys.executable, str(REPO / "scripts" / "experiment.py"), str(experiment), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if kill_after is None:
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    while not Path(kill_after).exists():
        assert process.poll() is None, "the driver ended before the step to kill it in"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the tool it runs, as a power cut would
    process.wait()
    return None


def cells(path: Path) -> dict[tuple[str, str, str], dict]:
    with open(path, newline="") as handle:
        return {(row["model"], row["task"], row["metric"]): row for row in csv.DictReader(handle)}


def test_demo_experiment_small_end_to_end_with_a_kill(tmp_path):
    experiment = small_experiment(tmp_path)
    out = tmp_path / "out"
    # killed during continual pre-training of the fiddle run (its stage 1 has started)
    run_driver(experiment, kill_after=str(run_folder(out, "fiddle") / "stage1" / "hydra"))
    assert not (out / "report").exists()
    result = run_driver(experiment)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out / "report"
    for name in [*TABLES, *FIGURES, "README.md"]:
        assert (report / name).is_file(), name
    readme = (report / "README.md").read_text()
    assert all(name in readme for name in FIGURES)
    for title in ("Test ROC-AUC (%),", "What the intervals resolve (", "per tag group"):
        assert result.stdout.count(title) == (2 if title == "per tag group" else 1), title
    assert result.stdout.count("- adaptation, ") == 2  # over the whole tasks and per tag group

    # every reported number equals scikit-learn on the saved predictions of the chosen run; so does
    # each tag group's, over the group's tags of the same run, which has a cell where one of its
    # tags has both classes in the test split (3 tracks here)
    table = cells(report / "table_4_1.csv")
    groups = cells(report / "table_4_1_groups.csv")
    for (model, task, metric), row in table.items():
        if metric != "roc_auc":
            continue
        folder = out / "probes" / model.replace(" ", "_") / task / row["layer"]
        with np.load(folder / "predictions.npz") as data:
            tags, y_true, scores = data["tags"].astype(str), data["y_true"], data["scores"]
        kept = (y_true.sum(axis=0) > 0) & (y_true.sum(axis=0) < len(y_true))
        per_seed = [roc_auc_score(y_true[:, kept], s[:, kept], average="macro") for s in scores]
        assert float(row["mean"]) == pytest.approx(np.mean(per_seed), abs=1e-9)
        assert float(row["ci_low"]) <= float(row["ci_high"])
        results = json.loads((folder / "results.json").read_text())
        assert float(row["mean"]) == pytest.approx(results["mean"]["roc_auc"], abs=1e-6)
        for group in dict.fromkeys(tag.split("=")[0] for tag in tags):
            in_group = np.char.startswith(tags, f"{group}=") & kept
            cell = groups.get((model, f"{task}/{group}", "roc_auc"))
            assert (cell is not None) == in_group.any(), (model, task, group)
            if cell is not None:
                assert cell["layer"] == row["layer"]
                per_seed = [roc_auc_score(y_true[:, in_group], s[:, in_group]) for s in scores]
                assert float(cell["mean"]) == pytest.approx(np.mean(per_seed), abs=1e-9)
    assert table[("untrained", "western", "roc_auc")]["difference"] == ""
    assert ("fiddle", "fiddle/tuning", "roc_auc") in groups

    # a rerun does nothing and leaves the same tables; a changed probing setting reruns the fits only
    before = (report / "table_4_1.csv").read_text()
    again = run_driver(experiment)
    assert again.returncode == 0 and "ran 0 steps" in again.stdout
    assert (report / "table_4_1.csv").read_text() == before
    changed = run_driver(experiment, "report.resamples=100")
    assert changed.returncode == 0 and "ran 1 steps" in changed.stdout


def test_stage_curves_parse_fairseq_simple_logs(tmp_path):
    log = tmp_path / "hydra_train.log"
    line = (
        "[2026-11-30 13:15:4{0},093][train_inner][INFO] - epoch 001:      {0} / 3 loss={1}, loss_cb0=7.8, "
        "acc_cb0=0, ups=0, bsz=2, num_updates={0}, lr=0.0005, gnorm={2}, clip=100, train_wall=1, wall=6"
    )
    log.write_text(
        "\n".join(
            [
                line.format(1, 587.0, 83.2),
                line.format(2, 591.2, 72.5),
                "[x][train][INFO] - epoch 001 | loss 1",
                line.format(2, 590.0, 70.0),
                line.format(3, 1e-05, 79.3),
            ]
        )  # fmt: skip
    )
    curves = stage_curves(log)
    assert curves["num_updates"] == [1, 2, 3]
    assert curves["loss"] == [587.0, 590.0, 1e-05]  # the resumed update's last line wins
    assert curves["gnorm"] == [83.2, 70.0, 79.3]


def test_bad_experiment_files_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(OmegaConf.to_yaml({**OmegaConf.to_container(OmegaConf.load(DEMO)), "colour": 1}))
    with pytest.raises(ExperimentError, match="colour"):
        load_experiment(bad)
    with pytest.raises(ExperimentError, match="unknown runs"):
        load_experiment(DEMO, ["merges=[{name: x, runs: [nope]}]"])
    assert main([str(DEMO), "--dry-run", f"out={tmp_path}"]) == 0
    assert "cpt/fiddle" in capsys.readouterr().out


def test_steps_run_only_what_is_missing_and_never_reuse_unproven_state(tmp_path):
    from culturemert.experiment.steps import Runner, Step, StepError

    source = tmp_path / "input.txt"
    source.write_text("a")
    calls = []

    def make(name: str, after: list[str] = ()) -> Step:
        folder = tmp_path / name

        def action() -> None:
            calls.append(name)
            (folder / "keep.txt").write_text(source.read_text() + str((folder / "partial").exists()))

        return Step(name, folder, action, [folder / "keep.txt"], inputs=[source], after=list(after))

    Runner().run([make("first"), make("second", ["first"])])
    assert calls == ["first", "second"]
    Runner().run([make("first"), make("second", ["first"])])
    assert calls == ["first", "second"]  # done: skipped
    source.write_text("b")  # a changed input reruns the step and what depends on it, afresh
    (tmp_path / "first" / "stale").write_text("x")
    Runner().run([make("first"), make("second", ["first"])])
    assert calls[2:] == ["first", "second"] and not (tmp_path / "first" / "stale").exists()
    # killed while running: the same inputs resume in place (the tool's partial state is kept)
    record = json.loads((tmp_path / "second" / "step.json").read_text())
    (tmp_path / "second" / "step.json").write_text(json.dumps({**record, "status": "running"}))
    (tmp_path / "second" / "partial").write_text("")
    Runner().run([make("first"), make("second", ["first"])])
    assert calls[4:] == ["second"] and (tmp_path / "second" / "keep.txt").read_text() == "bTrue"
    # a folder that no step.json vouches for is removed before the step runs
    (tmp_path / "second" / "step.json").unlink()
    Runner().run([make("first"), make("second", ["first"])])
    assert calls[5:] == ["second"] and (tmp_path / "second" / "keep.txt").read_text() == "bFalse"
    source.unlink()
    with pytest.raises(StepError, match="input.txt: input not found"):
        Runner().run([make("first")])


def test_runs_share_token_caches_only_with_their_teacher(tmp_path):
    """Token caches under <data>/tokens are kept for the teacher that made them and removed when
    the teacher file changes (they would be refused, and cannot be proved to fit)."""
    from culturemert.experiment.plan import share_tokens

    teacher, tokens = tmp_path / "teacher.th", tmp_path / "tokens"
    teacher.write_bytes(b"first teacher")
    share_tokens(tokens, teacher)
    (tokens / "stage2").mkdir()
    share_tokens(tokens, teacher)
    assert (tokens / "stage2").is_dir()  # same teacher: the caches are shared
    teacher.write_bytes(b"another teacher")
    share_tokens(tokens, teacher)
    assert not (tokens / "stage2").exists() and (tokens / "teacher.sha256").is_file()
    (tokens / "teacher.sha256").unlink()
    (tokens / "stage1").mkdir()
    share_tokens(tokens, teacher)  # caches that no marker ties to a teacher are removed too
    assert not (tokens / "stage1").exists()


def test_the_resolved_effects_count_each_cell_by_its_interval_and_direction(tmp_path):
    """The demo's experiment with a hand-made table: a cell counts as resolved only where its
    interval excludes 0 on the side the effect claims (a gain on the source is not forgetting)."""
    experiment = load_experiment(REPO / "configs" / "experiments" / "demo.yaml")
    cells_by_model = {  # (difference, low, high) in points against source
        "untrained": {"western": (-7, -9, -5), "essen": (-2, -5, 1), "fiddle": (-6, -8, -4)},
        "control": {"western": (2, 1, 3), "essen": (0, -1, 1), "fiddle": (1, -1, 3)},
        "essen": {"western": (-3, -5, -1), "essen": (4, 2, 6), "fiddle": (0, -2, 2)},
        "fiddle": {"western": (2, 1, 3), "essen": (1, -1, 3), "fiddle": (-3, -5, -1)},
    }
    table = tmp_path / "table_4_1.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "task", "metric", "mean", "difference", "difference_low",
                         "difference_high", "significant"])  # fmt: skip
        for task in ("western", "essen", "fiddle"):
            writer.writerow(["source", task, "roc_auc", 0.8, "", "", "", ""])
        for model, tasks in cells_by_model.items():
            for task, (difference, low, high) in tasks.items():
                values = [value / 100 for value in (80 + difference, difference, low, high)]
                writer.writerow([model, task, "roc_auc", *values, low > 0 or high < 0])
    lines = resolved_effects(table, experiment, {"western"}).splitlines()
    assert lines[1:] == [
        "- gate, source above the start model untrained: western -7.0*, essen -2.0, fiddle -6.0*: "
        "resolved in 2 of 3",
        "- more training alone (control, on source audio): western +2.0*, essen +0.0, fiddle +1.0: "
        "resolved in 1 of 3",
        "- adaptation, each run on its own target: essen on essen +4.0*, fiddle on fiddle -3.0*: "
        "resolved in 1 of 2",
        "- forgetting, the adapted runs on the source tasks (a loss): essen on western -3.0*, "
        "fiddle on western +2.0*: resolved in 1 of 2",
    ]


def test_the_resolved_effects_per_tag_group_sort_groups_by_their_task(tmp_path):
    """Per tag group, a group of a run's target task counts as adaptation and a group of a source
    task as forgetting; the title says the cells are groups."""
    experiment = load_experiment(REPO / "configs" / "experiments" / "demo.yaml")
    table = tmp_path / "table_4_1_groups.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "task", "metric", "mean", "difference", "difference_low",
                         "difference_high", "significant"])  # fmt: skip
        for label, difference in {"western/key": -0.03, "essen/tuning": 0.04, "essen/key": -0.01}.items():
            writer.writerow(["source", label, "roc_auc", 0.8, "", "", "", ""])
            low, high = difference - 0.02, difference + 0.02
            writer.writerow(["essen", label, "roc_auc", 0.8 + difference, difference, low, high,
                             low > 0 or high < 0])  # fmt: skip
    lines = resolved_effects(table, experiment, {"western"}, grouped=True).splitlines()
    assert lines == [
        "What the intervals resolve per tag group (differences to source in points, * where resolved):",
        "- adaptation, each run on its own target: essen on essen/tuning +4.0*, essen on essen/key -1.0: "
        "resolved in 1 of 2",
        "- forgetting, the adapted runs on the source tasks (a loss): essen on western/key -3.0*: "
        "resolved in 1 of 1",
    ]
