"""The experiment's report folder: every table and figure of the thesis's chapter 4 that the
experiment has the runs for, and a README.md listing each with how it was made."""

from __future__ import annotations

from pathlib import Path

from culturemert.experiment import figures
from culturemert.experiment.config import Experiment, model_names
from culturemert.experiment.logs import run_curves
from culturemert.experiment.plan import Plan, merge_folder, run_folder
from culturemert.experiment.tables import write_group_table, write_tables
from culturemert.files import write_atomically
from culturemert.probing.figures import bars, lambda_sweep, layerwise, transfer_matrix
from culturemert.probing.runs import load_runs, table_cells
from culturemert.probing.tables import ordered_models, ordered_tasks
from culturemert.probing.tag_groups import group_cells, group_columns

DESCRIPTIONS = {
    "table_4_1.md": "Table 4.1: ROC-AUC and AP per model and dataset (also .csv, in fractions)",
    "table_4_1_groups.md": "Table 4.1 per tag group (tags named group=value), paired intervals (also .csv)",
    "table_4_2.md": "Table 4.2: micro- and macro-F1 per model and dataset (also .csv)",
    "layers.md": "the layer of each table cell, chosen on validation ROC-AUC",
    "fig_4_1_roc_auc.png": "Fig 4.1: ROC-AUC per dataset, bars per model, 95 % bootstrap intervals",
    "fig_4_2_transfer.png": "Fig 4.2: ROC-AUC of each model minus the baseline's, paired 95 % intervals",
    "fig_4_3_token_similarity.png": "Fig 4.3: JSD and cosine distance of the EnCodec token histograms",
    "fig_4_4_lambda_sweep.png": "Fig 4.4: ROC-AUC per dataset over the task-arithmetic lambda sweep",
    "fig_4_5_task_vectors.png": "Fig 4.5: cosine similarity of the task vectors (whole model)",
    "fig_4_6_sweep_vs_multi.png": "Fig 4.6: mean target ROC-AUC over lambda against the multi-culture model",
    "fig_4_7_layerwise.png": "Fig 4.7: test ROC-AUC per layer (mean ± std over seeds; dashed: weighted sum)",
    "fig_4_8_checkpoints.png": "Fig 4.8: one probe's ROC-AUC across a run's kept checkpoints",
    "fig_4_9_loss.png": "Fig 4.9: total, acoustic and CQT training loss per stage (fairseq logs)",
    "fig_4_10_codebook_loss.png": "Fig 4.10: per-codebook training loss per stage",
    "fig_4_11_grad_norm.png": "Fig 4.11: gradient norm per stage",
}


def write_report(experiment: Experiment, plan: Plan, folder: Path) -> list[Path]:
    """Write the tables, figures and README.md into `folder`; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    out = Path(experiment.out)
    baseline = experiment.report.baseline
    layers = {str(layer) for layer in experiment.probing.layers}
    runs = [  # only this experiment's grid: a folder left by an earlier version of the file is not reported
        run
        for run in _load_runs(out / "probes")
        if run["model"] in model_names(experiment)
        and run["task"] in experiment.tasks
        and str(run["layer"]) in layers
    ]
    cells = table_cells(runs, baseline, experiment.report.resamples, experiment.seed) if runs else {}
    models = ordered_models(cells, baseline, model_names(experiment))
    tasks = ordered_tasks(cells, list(experiment.tasks))
    source = {name for name, task in experiment.tasks.items() if task.source}
    targets = [t for t in tasks if t not in source]
    written = write_tables(cells, baseline, models, tasks, source, folder) if cells else []
    groups = group_cells(cells, baseline, experiment.report.resamples, experiment.seed)
    if groups:
        written += write_group_table(groups, baseline, models, group_columns(groups, tasks), folder)
    sweep = next((m for m in experiment.merges if m.name == experiment.report.sweep), None)
    sweep_models = (
        [] if sweep is None else [name for name in models if name.startswith(f"{sweep.name} lambda_")]
    )
    labels = {str(plan.models[run][0]): run for run in plan.models}
    similarity_tables = [merge_folder(out, m.name) / "task_vector_similarity.csv" for m in experiment.merges]
    plots = {
        "fig_4_1_roc_auc.png": lambda p: bars(cells, models, tasks, p),
        "fig_4_2_transfer.png": lambda p: transfer_matrix(cells, baseline, models, tasks, p),
        "fig_4_3_token_similarity.png": lambda p: figures.token_similarity(out / "similarity" / "tables", p),
        "fig_4_4_lambda_sweep.png": lambda p: lambda_sweep(cells, sweep_models, baseline, tasks, p),
        "fig_4_5_task_vectors.png": lambda p: next(
            (figures.task_vector_cosine(csv, labels, p) for csv in similarity_tables if csv.is_file()), None
        ),
        "fig_4_6_sweep_vs_multi.png": lambda p: figures.sweep_average(
            cells, sweep_models, experiment.report.multi, targets, p
        ),
        "fig_4_7_layerwise.png": lambda p: layerwise(runs, models, tasks, p),
        "fig_4_8_checkpoints.png": lambda p: _checkpoint_figure(experiment, runs, p),
    }
    curves = {run.name: run_curves(run_folder(out, run.name)) for run in experiment.runs}
    codebooks = sorted(
        {k for stages in curves.values() for v in stages.values() for k in v if k.startswith("loss_cb")}
    )
    plots |= {
        "fig_4_9_loss.png": lambda p: figures.training_curves(
            curves,
            ["loss", "loss_acoustic", "loss_cqt"],
            "training loss (log scale)",
            "Training loss per stage: total = α·acoustic + β·CQT",
            p,
            log_scale=True,
        ),
        "fig_4_10_codebook_loss.png": lambda p: figures.training_curves(
            curves, codebooks, "cross-entropy", "Per-codebook loss (EnCodec codebooks cb0-cb7)", p
        ),
        "fig_4_11_grad_norm.png": lambda p: figures.training_curves(
            curves, ["gnorm"], "gradient norm (before clipping)", "Gradient norm per stage", p
        ),
    }
    for name, plot in plots.items():
        path = plot(folder / name)
        if path is not None:
            written.append(path)
    readme = folder / "README.md"
    text = _readme(experiment, [p.name for p in written])
    write_atomically(readme, lambda handle: handle.write(text.encode()))
    return [*written, readme]


def _load_runs(folder: Path) -> list[dict]:
    """The probe runs under `folder`, none where it does not exist (yet)."""
    return load_runs([folder]) if folder.is_dir() else []


def _checkpoint_figure(experiment: Experiment, runs: list[dict], path: Path) -> Path | None:
    probe = experiment.report.checkpoints
    if probe.run is None:
        return None
    out = Path(experiment.out)
    checkpoint_runs = _load_runs(out / "checkpoints" / probe.run / "probes")
    start = next(
        (
            (100 * r["mean"]["roc_auc"], 100 * r["std"]["roc_auc"])
            for r in runs
            if r["model"] == experiment.start.name
            and r["task"] == probe.task
            and str(r["layer"]) == str(probe.layer)
        ),
        None,
    )
    title = f"{probe.run}: {probe.task} probe, layer {probe.layer}, across kept checkpoints"
    return figures.checkpoint_curve(checkpoint_runs, title, start, path)


def _readme(experiment: Experiment, written: list[str]) -> str:
    lines = [
        f"# Report of experiment `{experiment.name}`",
        "",
        "Made by `python scripts/experiment.py` from the probe runs under `probes/`, the merges under",
        "`merge/`, the token similarity under `similarity/` and the fairseq logs under `cpt/`.",
        f"Baseline of the paired bootstrap: {experiment.report.baseline}; "
        f"{experiment.report.resamples} resamples of the test recordings (culturemert/probing/bootstrap.py).",
        "",
    ]
    lines += [f"- `{name}`: {DESCRIPTIONS[name]}" for name in written if name in DESCRIPTIONS]
    missing = [name for name in DESCRIPTIONS if name not in written and not name.endswith(".csv")]
    if missing:
        lines += [
            "",
            "Not made (the experiment has no runs for them): " + ", ".join(f"`{n}`" for n in missing),
        ]
    return "\n".join(lines) + "\n"
