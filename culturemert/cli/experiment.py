"""Run an experiment file: every step that is missing, then the report (thesis chapter 4).

    python scripts/experiment.py configs/experiments/demo.yaml [key=value ...]

The YAML (configs/experiments/*.yaml; schema: culturemert/experiment/config.py) names the start
checkpoint, the teacher, the data, the CPT runs, the merges, the probing grid and the
token-similarity sets; ``key=value`` arguments override it (omegaconf dotlist, e.g.
``probing.seeds=2 out=runs/x``). A step whose outputs exist and whose inputs are unchanged is
skipped; an interrupted experiment resumes when rerun; a changed input reruns what depends on it.
The report (tables, figures, README.md) is written to ``<out>/report/``, and Table 4.1's ROC-AUC
printed (`culturemert.experiment.summary`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from culturemert.cli import command
from culturemert.experiment.config import load_experiment
from culturemert.experiment.plan import Plan
from culturemert.experiment.steps import Runner, Step
from culturemert.experiment.summary import console_table, resolved_effects

logger = logging.getLogger("experiment")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", type=Path, help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    parser.add_argument("--dry-run", action="store_true", help="list the steps instead of running them")
    args = parser.parse_intermixed_args(argv)
    for name in ("experiment", "culturemert.experiment"):  # the tools run in-process lower the root level
        logging.getLogger(name).setLevel(logging.INFO)
    experiment = load_experiment(args.experiment, args.overrides)
    plan = Plan(experiment)
    if args.dry_run:
        for step in plan.steps():
            print(step.name)
        return 0
    from culturemert.experiment.report import write_report  # matplotlib: after logging is configured

    runner = Runner(total=len(list(Plan(experiment).steps())) + 1)  # and the report
    runner.run(plan.steps())
    folder = Path(experiment.out) / "report"
    report = Step(
        "report",
        folder,
        lambda: write_report(experiment, plan, folder),
        [folder / "README.md"],
        settings={"report": repr(experiment.report), "tasks": repr(experiment.tasks)},
        after=list(runner.fingerprints),
    )
    runner.run_step(report)
    source = {name for name, task in experiment.tasks.items() if task.source}
    for table, grouped in ((folder / "table_4_1.csv", False), (folder / "table_4_1_groups.csv", True)):
        if table.is_file():
            print("\n" + console_table(table, experiment.report.baseline, source, grouped))
            print("\n" + resolved_effects(table, experiment, source, grouped))
    print(f"\nran {len(runner.ran)} steps; the report, its tables and figures: {folder / 'README.md'}")
    return 0


entry = command(main, "experiment")
