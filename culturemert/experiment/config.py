"""The experiment file: what the thesis's evaluation (chapter 4) runs, as dataclasses.

An experiment YAML names the start checkpoint and the teacher, the data per culture, the CPT runs
(thesis 3.3), the merges (thesis 3.4), the probing grid (thesis 3.5) and the token-similarity
sets (thesis 4.2). It is read with omegaconf onto `Experiment`, so unknown keys and wrong types
are refused, and ``key=value`` overrides (omegaconf dotlist) are merged on top. Relative paths
are relative to the directory the driver runs in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from culturemert.errors import UserError
from culturemert.music_corpus import WESTERN_INSTRUMENTS


class ExperimentError(UserError):
    """An experiment file that cannot be run; the message names the key and the problem."""


@dataclass
class Domain:
    """One rendered domain (`culturemert.music_corpus`): pieces per collection, the instruments,
    tunings and transposition drawn per piece, and the tags its probing task carries."""

    collections: Dict[str, int] = field(default_factory=dict)
    instruments: List[str] = field(default_factory=lambda: list(WESTERN_INSTRUMENTS))
    tunings: List[str] = field(default_factory=lambda: ["equal"])
    transpose: bool = False
    tags: List[str] = field(
        default_factory=lambda: ["collection", "tune_type", "region", "instrument", "tempo"]
    )


@dataclass
class Render:
    """Real music rendered offline in place of a dataset: the domains, each split into
    train/valid/test by `split` (shares), and the seconds rendered per piece."""

    domains: Dict[str, Domain] = field(default_factory=dict)
    split: Dict[str, float] = field(default_factory=lambda: {"train": 0.6, "valid": 0.2, "test": 0.2})
    seconds: float = 8.0
    seed: int = 0


@dataclass
class Start:
    """The model continual pre-training starts from (thesis 3.3): a checkpoint, or a random one of
    a model config (``configs/model/*.yaml``) when ``checkpoint`` is empty."""

    checkpoint: Optional[str] = None
    model_config: Optional[str] = None
    name: str = "MERT-v1-95M"


@dataclass
class Teacher:
    """The acoustic teacher: EnCodec weights, or (``checkpoint`` empty) an untrained EnCodec
    with codebooks drawn from a run's audio, seeded (a random-projection quantiser)."""

    checkpoint: Optional[str] = None
    from_data_run: Optional[str] = None
    seed: int = 0


@dataclass
class CptRun:
    """One continual pre-training run (``scripts/run_cpt.sh``): its data preparation
    (``configs/data`` run or YAML, cultures and replay) and its training config."""

    name: str = "???"
    config: str = "???"  # configs/cpt/<config>_stage{1,2}.yaml
    data: str = "???"  # prepare_data.py --run
    cultures: List[str] = field(default_factory=list)
    replay: bool = True
    replay_stages: Optional[str] = None  # prepare_data.py --replay-stages (Table 4.3: both)
    ablation: Optional[str] = None  # configs/ablation/<ablation>.yaml
    overrides: List[str] = field(default_factory=list)
    checkpoint_interval: Optional[int] = None  # keep a checkpoint every N updates (Fig 4.8)
    init: Optional[str] = None  # start from an earlier run instead of the start model


@dataclass
class Merge:
    """Task arithmetic over CPT runs (``scripts/merge.py``): one model per lambda."""

    name: str = "???"
    runs: List[str] = field(default_factory=list)
    method: str = "task_arithmetic"
    lambdas: List[float] = field(default_factory=lambda: [0.2])
    density: Optional[float] = None
    base: Optional[str] = None  # theta_pre: a run's model instead of the start model


@dataclass
class ProbeTask:
    """A probing task (``scripts/probe.py extract``): a built-in name or a CSV, its audio and tags."""

    task: str = "???"
    audio_root: str = "???"
    metadata: Optional[str] = None
    splits_root: Optional[str] = None
    source: bool = False  # a Western task (averaged apart from the target cultures)


@dataclass
class Probing:
    """The probing grid: models x tasks x layers (``all``: the weighted sum), each over seeds."""

    models: List[str] = field(default_factory=list)  # default: start, every run and merge
    layers: List[Any] = field(default_factory=lambda: [*range(13), "all"])
    seeds: int = 5
    extract_flags: List[str] = field(default_factory=list)
    fit_flags: List[str] = field(default_factory=list)


@dataclass
class CheckpointProbe:
    """Fig 4.8: one probe (task, layer) over the checkpoints a run kept at its interval."""

    run: Optional[str] = None
    task: Optional[str] = None
    layer: Any = "all"


@dataclass
class Report:
    """The report's choices: the baseline of the paired bootstrap, the resamples, the
    multi-culture run of Fig 4.6 and the sweep of Figs 4.4/4.6."""

    baseline: Optional[str] = None  # default: the start model
    resamples: int = 1000
    multi: Optional[str] = None
    sweep: Optional[str] = None
    checkpoints: CheckpointProbe = field(default_factory=CheckpointProbe)


@dataclass
class Experiment:
    name: str = "???"
    out: str = "???"
    seed: int = 0
    preset: Optional[str] = None  # run_cpt.sh PRESET (tiny: CPU-sized steps)
    render: Render = field(default_factory=Render)
    start: Start = field(default_factory=Start)
    teacher: Teacher = field(default_factory=Teacher)
    cultures: Dict[str, str] = field(default_factory=dict)  # culture -> audio root
    splits: Dict[str, str] = field(default_factory=dict)  # culture (or replay) -> split CSV/folder
    replay: Optional[str] = None  # Western replay audio root
    runs: List[CptRun] = field(default_factory=list)
    merges: List[Merge] = field(default_factory=list)
    tasks: Dict[str, ProbeTask] = field(default_factory=dict)
    probing: Probing = field(default_factory=Probing)
    similarity: Dict[str, str] = field(default_factory=dict)  # set -> manifest (.tsv) or token cache
    report: Report = field(default_factory=Report)


def load_experiment(path: str | Path, overrides: List[str] = ()) -> Experiment:
    """Read the experiment file `path` with ``key=value`` `overrides` merged on top."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"{path}: no such experiment file")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(Experiment), OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides))
        )
        experiment: Experiment = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        raise ExperimentError(f"{path}: {message}") from None
    check(experiment, path)
    return experiment


def check(experiment: Experiment, path: Path) -> None:
    """Cross-references: runs named by merges, the teacher and the report exist; names unique."""
    runs = [run.name for run in experiment.runs]
    merges = [merge.name for merge in experiment.merges]
    names = [experiment.start.name, *runs, *merges]
    if len(set(names)) != len(names):
        raise ExperimentError(f"{path}: the start model, run and merge names must be distinct: {names}")
    for index, run in enumerate(experiment.runs):
        if run.init is not None and run.init not in runs[:index]:
            raise ExperimentError(f"{path}: run {run.name!r} starts from {run.init!r}, not an earlier run")
    for merge in experiment.merges:
        if merge.base is not None and merge.base not in runs:
            raise ExperimentError(
                f"{path}: merge {merge.name!r} has base {merge.base!r}, not a run of {runs}"
            )
        unknown = [run for run in merge.runs if run not in runs]
        if unknown or not merge.runs:
            raise ExperimentError(f"{path}: merge {merge.name!r} names unknown runs {unknown}; runs: {runs}")
    if experiment.start.checkpoint is None and experiment.start.model_config is None:
        raise ExperimentError(f"{path}: start needs a checkpoint or a model_config")
    teacher = experiment.teacher
    if teacher.checkpoint is None and teacher.from_data_run not in runs:
        raise ExperimentError(f"{path}: teacher needs a checkpoint or from_data_run naming a run of {runs}")
    for model in experiment.probing.models:
        if model not in model_names(experiment):
            raise ExperimentError(f"{path}: probing model {model!r} is not one of {model_names(experiment)}")
    report = experiment.report
    if report.baseline is None:
        report.baseline = experiment.start.name
    if report.baseline not in model_names(experiment):
        raise ExperimentError(f"{path}: report.baseline {report.baseline!r} is not a probed model")
    probe = report.checkpoints
    if probe.run is not None and (probe.run not in runs or probe.task not in experiment.tasks):
        raise ExperimentError(f"{path}: report.checkpoints needs one of the runs {runs} and a task")


def merged_models(merge: Merge) -> list[str]:
    """The model names of a merge: its name, or one per lambda of a sweep."""
    if len(merge.lambdas) == 1:
        return [merge.name]
    return [f"{merge.name} lambda_{value!r}" for value in merge.lambdas]


def model_names(experiment: Experiment) -> list[str]:
    """Every model the experiment has: the start checkpoint, the runs, the merged models."""
    merged = [name for merge in experiment.merges for name in merged_models(merge)]
    return [experiment.start.name, *[run.name for run in experiment.runs], *merged]
