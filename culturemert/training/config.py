"""The composed configuration of one stage: configs/ as data, composed the way fairseq does.

Composition, a later value winning (thesis 3.3 for the values): ``configs/stage.yaml``, the
stage overlay ``configs/stage/stage<n>.yaml``, the preset (``configs/preset/``), the run
(``configs/cpt/<run>_stage<n>.yaml``), the ablation (``configs/ablation/``), then the command
line's overrides. So a run's own values win over a preset's. The result is written as one
YAML file that ``fairseq-hydra-train`` reads as its primary config: what runs is what the run
folder records. An override of a setting that does not exist is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import typing
import warnings
from pathlib import Path

import yaml
from fairseq.dataclass.configs import FairseqConfig
from fairseq.dataclass.initialize import add_defaults
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from culturemert.criterions.mert_mlm import MertMlmConfig
from culturemert.errors import UserError
from culturemert.files import write_atomically
from culturemert.lr_scheduler import CptCosineConfig
from culturemert.models.config import MertConfig
from culturemert.tasks.mert_cpt import MertCptConfig

logger = logging.getLogger(__name__)

BASE = "stage"  # configs/stage.yaml: the primary config, validated against FairseqConfig
STAGES = (1, 2)

# Composed values the launcher logs for every stage: what decides a run's cost and result.
LOGGED = (
    "optimization.max_update",
    "optimization.lr",
    "lr_scheduler.min_lr",
    "lr_scheduler.warmup_ratio",
    "dataset.batch_size",
    "optimization.update_freq",
    "task.crop_samples",
    "task.trainable",
    "task.mixup_prob",
    "criterion.codebooks_per_batch",
    "common.fp16",
    "common.amp",
    "common.seed",
    "model.encoder_layerdrop",
)


SPELLING = "check the spelling of your overrides (fairseq-hydra-train --help lists the settings)"


class ConfigError(UserError):
    """A run, preset, ablation or override that does not compose into a stage configuration."""


@dataclasses.dataclass
class LauncherConfig(FairseqConfig):
    """FairseqConfig with this plugin's model, task, criterion and schedule as typed sections
    (so every setting can be overridden without restating its default in YAML, and a misspelt
    one is refused), plus what only the launcher reads: ``stages``, the stages an ablation runs
    (e.g. ``stages: [2]``), removed before the config is written for fairseq."""

    model: MertConfig = dataclasses.field(default_factory=MertConfig)
    task: MertCptConfig = dataclasses.field(default_factory=MertCptConfig)
    criterion: MertMlmConfig = dataclasses.field(default_factory=MertMlmConfig)
    lr_scheduler: CptCosineConfig = dataclasses.field(default_factory=CptCosineConfig)
    stages: typing.Optional[typing.List[int]] = None


def _register_schema() -> None:
    """What ``fairseq.dataclass.initialize.hydra_init`` does, with `LauncherConfig`."""
    store = ConfigStore.instance()
    store.store(name=BASE, node=LauncherConfig)
    for name, field in FairseqConfig.__dataclass_fields__.items():
        store.store(name=name, node=field.default)


def group_options(configs: Path, group: str) -> list[str]:
    return sorted(path.stem for path in (configs / group).glob("*.yaml"))


def runs(configs: Path) -> list[str]:
    """The runs of ``configs/cpt/``: names with a ``<run>_stage1.yaml``."""
    return [name[: -len("_stage1")] for name in group_options(configs, "cpt") if name.endswith("_stage1")]


def check_choice(configs: Path, group: str, name: str, what: str) -> None:
    options = group_options(configs, group)
    if name not in options:
        raise ConfigError(f"no {what} '{name}' in {configs / group}; one of: {', '.join(options)}")


def ablation_stages(configs: Path, ablation: str | None) -> list[int]:
    """The stages a run makes: ``stages`` of the ablation's file, else both."""
    if not ablation:
        return list(STAGES)
    check_choice(configs, "ablation", ablation, "ablation")
    stages = (yaml.safe_load((configs / "ablation" / f"{ablation}.yaml").read_text()) or {}).get("stages")
    if stages is None:
        return list(STAGES)
    if not stages or not set(stages) <= set(STAGES):
        raise ConfigError(f"configs/ablation/{ablation}.yaml: stages must list some of {list(STAGES)}")
    return sorted(stages)


def compose_stage(
    configs: Path,
    stage: int,
    run: str,
    preset: str | None = None,
    ablation: str | None = None,
    overrides: typing.Sequence[str] = (),
) -> DictConfig:
    """The stage's configuration (interpolations kept), before the launcher's own settings."""
    groups = [f"+stage=stage{stage}"]
    if preset:
        check_choice(configs, "preset", preset, "preset")
        groups.append(f"+preset={preset}")
    groups.append(f"+cpt={run}_stage{stage}")
    if ablation:
        groups.append(f"+ablation={ablation}")
    _register_schema()
    try:
        with warnings.catch_warnings():  # Hydra's note on schema matching: fairseq's way, kept
            warnings.simplefilter("ignore", UserWarning)
            with initialize_config_dir(config_dir=str(configs.resolve()), version_base=None):
                cfg = compose(BASE, overrides=[*groups, *overrides])
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(f"stage {stage}: {_first_line(error)}") from None
    with open_dict(cfg):
        cfg.pop("stages", None)
    filled(cfg, stage)
    return cfg


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def filled(cfg: DictConfig, stage: int) -> DictConfig:
    """A copy with the model's, task's, ... defaults filled in from their registered dataclasses,
    as fairseq does when it starts; so a ``+task.typo=1`` is refused before training."""
    unknown = [key for key in cfg if key not in FairseqConfig.__dataclass_fields__]
    unknown += [
        f"{section}.{key}"
        for section, kind in typing.get_type_hints(LauncherConfig).items()
        if dataclasses.is_dataclass(kind) and OmegaConf.is_dict(cfg.get(section))
        for key in cfg[section]
        if key not in kind.__dataclass_fields__
    ]
    if unknown:
        raise ConfigError(f"stage {stage}: no setting {', '.join(unknown)}; {SPELLING}")
    cfg = copy.deepcopy(cfg)
    try:
        add_defaults(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"stage {stage}: {_first_line(error)}; {SPELLING}") from None
    return cfg


def set_values(cfg: DictConfig, values: dict[str, object]) -> None:
    """Set dotted keys (``{"model.encoder_layers": 12}``) on a composed config."""
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def summary(cfg: DictConfig) -> str:
    """``key=value`` of the `LOGGED` values, one line."""
    values = []
    for key in LOGGED:
        value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        values.append(f"{key}={value}")
    return ", ".join(values)


def write_stage_config(cfg: DictConfig, path: Path) -> None:
    """The file ``fairseq-hydra-train --config-dir <dir> --config-name <stem>`` runs."""
    text = OmegaConf.to_yaml(cfg)
    write_atomically(path, lambda handle: handle.write(text.encode()))
