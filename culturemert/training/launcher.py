"""Two-stage continual pre-training of one run, from INIT to an exported HF folder (thesis 3.3).

`launch` composes every stage's configuration first (so a bad override is refused before any
work), takes the run folder's lock, builds missing token caches, checks that manifests and
caches fit together, reads INIT once (its architecture goes into every stage), checks or
records the run's fingerprint, writes the start checkpoint, and runs each unfinished stage as a
``fairseq-hydra-train`` process (behind ``LAUNCH``, e.g. torchrun) on the composed config file it
wrote into the stage's folder. Each stage starts a fresh optimizer and LR schedule from the
previous stage's last checkpoint; an interrupted stage resumes from its ``checkpoint_last.pt``
(or is marked finished if that checkpoint already made the stage's updates). Under a torchrun
LAUNCH the number of training processes is part of the fingerprint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import torch
from omegaconf import DictConfig, OmegaConf

from culturemert.checkpoint import convert
from culturemert.checkpoint_reading import read_checkpoint
from culturemert.data.manifest import ManifestError, read_manifest
from culturemert.errors import UserError
from culturemert.fingerprint import file_sha256
from culturemert.targets.token_cache import TokenCache, TokenCacheError
from culturemert.tasks.mert_cpt import DIE_WITH
from culturemert.training import config as configs
from culturemert.training import fingerprint, start

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid")
COMPOSED = "composed"  # <run>/stage<n>/composed.yaml: the config the stage runs
TINY_MODEL = "model/tiny.yaml"  # PRESET=tiny without INIT starts from a random model of this
# Settings that name where inputs and outputs lie; their contents are fingerprinted instead.
PATH_SETTINGS = (
    "common.user_dir",
    "task.data",
    "task.tokens",
    "checkpoint.save_dir",
    "checkpoint.finetune_from_model",
)
# What configs/launch/torchrun.yaml reads from torchrun's environment.
TORCHRUN_ENVIRONMENT = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class StageFailed(UserError):
    """A training process ended with an error; its log says why."""


class LaunchError(UserError):
    """A LAUNCH command, or run paths, that the stages cannot be started with."""


@dataclasses.dataclass
class Settings:
    """One run: ``run`` of configs/cpt/, the command-line overrides, and the environment."""

    repo: Path
    run: str
    overrides: list[str]
    name: str
    init: Path | None
    manifests: Path
    tokens: Path
    encodec: Path
    out: Path
    preset: str | None = None
    ablation: str | None = None
    launch: list[str] = dataclasses.field(default_factory=list)
    restart: bool = False

    @classmethod
    def from_environment(cls, repo: Path, run: str, overrides: list[str], env: dict[str, str]) -> Settings:
        """Settings from INIT, NAME, MANIFESTS, TOKENS, ENCODEC, CPT_OUT, PRESET, ABLATION,
        LAUNCH and RESTART (scripts/run_cpt.sh lists them with their defaults)."""
        name = env.get("NAME") or run
        manifests = Path(env.get("MANIFESTS") or f"data_manifests/{name}")
        preset = env.get("PRESET") or None
        init = env.get("INIT") or (None if preset == "tiny" else "weights/MERT-v1-95M_fairseq.pt")
        return cls(
            repo=repo,
            run=run,
            overrides=list(overrides),
            name=name,
            init=Path(init) if init else None,
            manifests=manifests,
            tokens=Path(env.get("TOKENS") or manifests / "tokens"),
            encodec=Path(env.get("ENCODEC") or "weights/encodec_24khz-d7cc33bc.th"),
            out=Path(env.get("CPT_OUT") or "runs") / name,
            preset=preset,
            ablation=env.get("ABLATION") or None,
            launch=shlex.split(env.get("LAUNCH", "")),
            restart=env.get("RESTART", "") not in ("", "0"),
        )

    @property
    def configs(self) -> Path:
        return self.repo / "configs"


def launch(settings: Settings) -> Path:
    """Run (or resume) every stage of ``settings``; returns the final fairseq checkpoint (the
    HF export is ``<run>/hf``)."""
    runs = configs.runs(settings.configs)
    if settings.run not in runs:
        raise configs.ConfigError(
            f"no run '{settings.run}' in {settings.configs / 'cpt'}; one of: {', '.join(runs)}"
        )
    stages = configs.ablation_stages(settings.configs, settings.ablation)
    composed = {
        stage: configs.compose_stage(
            settings.configs, stage, settings.run, settings.preset, settings.ablation, settings.overrides
        )
        for stage in stages
    }
    check_paths(settings)
    world_size = torchrun_world_size(settings.launch)
    if world_size is None and any(needs_torchrun(cfg) for cfg in composed.values()):
        raise LaunchError(
            "+launch=torchrun reads the world size, rank and device from torchrun's environment: set "
            'LAUNCH to a torchrun command, e.g. LAUNCH="torchrun --nproc_per_node 8" (README, "Scaling out")'
        )
    if settings.restart and settings.out.exists():
        logger.info(
            "RESTART=1: moved the previous %s to %s", settings.out, fingerprint.move_aside(settings.out)
        )
    with fingerprint.run_lock(settings.out) as lock:
        data = {stage: stage_data(settings, stage) for stage in stages}
        if settings.init is None:
            model = settings.configs / TINY_MODEL
            init = {"random": TINY_MODEL, "sha256": file_sha256(model), "seed": 0}
            first = start.random_start(model, seed=0)
        else:
            init = start.identify(settings.init)
            first = start.load_start(settings.init)
        for stage, cfg in composed.items():
            add_launcher_values(cfg, first, first_stage=stage == stages[0])
        record = {
            "init": init,
            "stages": {f"stage{s}": {"config": without_paths(composed[s]), "data": data[s]} for s in stages},
            "code": fingerprint.code_version(),
        }
        if world_size is not None:
            record["launch"] = {"world_size": world_size}  # not in the config under torchrun
        if fingerprint.check_or_record(settings.out, record):
            logger.info("new run %s: its inputs are recorded in %s", settings.out, fingerprint.FINGERPRINT)
        else:
            logger.info("%s: same inputs as recorded; resuming", settings.out)
        previous = settings.out / "init.pt"
        first.write(previous)
        for stage in stages:
            previous = run_stage(settings, stage, composed[stage], previous, lock)
        logger.info(convert(previous, settings.out / "hf"))
    return previous


def check_paths(settings: Settings) -> None:
    """Refuse run paths that the stage configuration cannot hold: OmegaConf reads ``${`` in a
    value as an interpolation."""
    paths = {"CPT_OUT/NAME": settings.out, "MANIFESTS": settings.manifests, "TOKENS": settings.tokens}
    paths["the repository"] = settings.repo
    bad = [f"{name} ({path})" for name, path in paths.items() if "${" in str(path)]
    if bad:
        raise LaunchError(f"'${{' in {', '.join(bad)} reads as an interpolation; use paths without it")


def torchrun_world_size(launch: list[str]) -> int | None:
    """The number of training processes of a torchrun LAUNCH (``torchrun`` or ``python -m
    torch.distributed.run``), read with torchrun's own parser; None for any other LAUNCH."""
    from torch.distributed import run as torchrun

    for at, word in enumerate(launch):
        if Path(word).name == "torchrun":
            arguments = launch[at + 1 :]
            break
        if word == "-m" and launch[at + 1 : at + 2] == ["torch.distributed.run"]:
            arguments = launch[at + 2 :]
            break
    else:
        return None

    def refuse(message: str) -> NoReturn:
        raise LaunchError(f"LAUNCH={shlex.join(launch)}: {message}")

    parser = torchrun.get_args_parser()
    parser.error = refuse  # argparse would print its usage and exit
    args = parser.parse_args([*arguments, "fairseq-hydra-train"])
    try:
        nodes = torchrun.parse_min_max_nnodes(args.nnodes)
        per_node = torchrun.determine_local_world_size(args.nproc_per_node)
    except (ValueError, RuntimeError) as error:
        refuse(str(error))
    if nodes[0] != nodes[1]:
        refuse(f"--nnodes {args.nnodes} lets the world size, so the effective batch, change; give one number")
    return nodes[0] * per_node


def needs_torchrun(cfg: DictConfig) -> bool:
    """Whether a stage reads torchrun's environment (``+launch=torchrun``)."""
    values = OmegaConf.to_container(cfg.distributed_training, resolve=False).values()
    read = [f"oc.env:{name}" for name in TORCHRUN_ENVIRONMENT if name not in os.environ]
    return any(isinstance(value, str) and any(r in value for r in read) for value in values)


def hydra_quoted(value: str) -> str:
    """``value`` as a quoted value of a Hydra override: quotes and the backslashes before them
    (or before the closing quote) escaped, every other character as it is."""
    return "'" + re.sub(r"(\\*)('|\Z)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value) + "'"


def stage_data(settings: Settings, stage: int) -> dict[str, str]:
    """Check a stage's manifests and token caches (building missing caches when ENCODEC names
    the teacher); returns their content hashes. All problems are told at once."""
    hashes, problems = {}, []
    for split in SPLITS:
        manifest_path = settings.manifests / f"stage{stage}" / f"{split}.tsv"
        cache = settings.tokens / f"stage{stage}" / split
        try:
            manifest = read_manifest(manifest_path)
            if not (cache / "meta.json").is_file():
                build_token_cache(settings, manifest_path, cache)
            TokenCache.open(cache, manifest)
        except (ManifestError, TokenCacheError) as error:
            problems.append(str(error))
            continue
        hashes[f"{split}.tsv"] = manifest.checksum()
        hashes[f"tokens/{split}/meta.json"] = file_sha256(cache / "meta.json")
    if problems:
        raise UserError(
            "the run's manifests and token caches do not fit together (rebuild a stale cache: delete "
            "it and set ENCODEC; write missing manifests with scripts/prepare_data.py):\n  "
            + "\n  ".join(problems)
        )
    return hashes


def build_token_cache(settings: Settings, manifest: Path, cache: Path) -> None:
    if not settings.encodec.is_file():
        raise TokenCacheError(
            f"no token cache {cache} and no EnCodec weights at {settings.encodec} to build it: get them "
            "(README, 'Weights') and set ENCODEC, or set TOKENS"
        )
    logger.info("building the token cache %s of %s", cache, manifest)
    command = [sys.executable, str(settings.repo / "scripts" / "extract_tokens.py")]
    command += ["--manifest", str(manifest), "--encodec", str(settings.encodec), "--out", str(cache)]
    if subprocess.run(command, check=False).returncode != 0:
        raise TokenCacheError(f"building the token cache {cache} failed (see above)")


def add_launcher_values(cfg: DictConfig, first: start.Start, first_stage: bool) -> None:
    """INIT's architecture, the fresh heads' training in the first stage, and the CPU fallback."""
    values = {f"model.{name}": value for name, value in first.cfg.architecture().items()}
    extra = first.trainable_patterns()
    if first_stage and extra:
        trainable = OmegaConf.select(cfg, "task.trainable", default=None) or ".*"
        values["task.trainable"] = ",".join([trainable, *extra])
        logger.info("the first stage also trains the freshly initialised heads: %s", ", ".join(extra))
    if not torch.cuda.is_available() and (cfg.common.get("fp16") or cfg.common.get("amp")):
        values.update({"common.fp16": False, "common.amp": False})
        logger.info("no CUDA device: training on the CPU in FP32 (common.fp16 and common.amp off)")
    configs.set_values(cfg, values)


def without_paths(cfg: DictConfig) -> dict:
    """The stage's settings for the fingerprint: all but `PATH_SETTINGS`."""
    container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    for key in PATH_SETTINGS:
        section, name = key.split(".")
        container.get(section, {}).pop(name, None)
    return container


def run_stage(settings: Settings, stage: int, cfg: DictConfig, previous: Path, lock: int) -> Path:
    """Run (resume, or skip if finished) one stage; returns its last checkpoint."""
    save_dir = settings.out / f"stage{stage}"
    last = save_dir / "checkpoint_last.pt"
    if (save_dir / "finished").exists():
        logger.info("stage %d already finished (%s), skipping", stage, save_dir)
        return last
    max_update = OmegaConf.select(cfg, "optimization.max_update", default=0)
    if max_update and last.is_file() and done_updates(last) >= max_update:
        # Saved its last checkpoint but was stopped before `finished` was written: fairseq would
        # take one more step before checking max_update.
        logger.info("stage %d already made its %d updates (%s), marking it finished", stage, max_update, last)
        (save_dir / "finished").touch()
        return last
    configs.set_values(
        cfg,
        {
            "common.user_dir": str(settings.repo / "culturemert"),
            "task.data": str(settings.manifests / f"stage{stage}"),
            "task.tokens": str(settings.tokens / f"stage{stage}"),
            "checkpoint.save_dir": str(save_dir),
            "checkpoint.finetune_from_model": str(previous),
        },
    )
    logger.info(
        "stage %d from %s -> %s: %s", stage, previous, save_dir, configs.summary(configs.filled(cfg, stage))
    )
    save_dir.mkdir(parents=True, exist_ok=True)
    configs.write_stage_config(cfg, save_dir / f"{COMPOSED}.yaml")
    train = shutil.which("fairseq-hydra-train")
    if train is None:
        raise StageFailed(
            "fairseq-hydra-train is not on PATH; activate the environment CultureMERT is installed in"
        )
    command = [*settings.launch, train, "--config-dir", str(save_dir), "--config-name", COMPOSED]
    command += [f"hydra.run.dir={hydra_quoted(str(save_dir / 'hydra'))}", "hydra.job.chdir=false"]
    env = dict(os.environ)
    env[DIE_WITH] = f"{os.getpid()}@{socket.gethostname()}"  # so no training process outlives the lock
    if not env.get("WANDB_API_KEY"):
        env.setdefault("WANDB_MODE", "offline")  # common.wandb_project logs locally without a key
    result = subprocess.run(command, env=env, pass_fds=(lock,), check=False)
    if result.returncode != 0:
        raise StageFailed(
            f"stage {stage} failed (exit status {result.returncode}); its log: "
            f"{save_dir / 'hydra' / 'hydra_train.log'}. Rerun the same command to resume it."
        )
    (save_dir / "finished").touch()
    return last


def done_updates(checkpoint: Path) -> int:
    """The updates a fairseq checkpoint has made (its tensors are not read)."""
    history = read_checkpoint(checkpoint, mmap=True).get("optimizer_history") or [{}]
    return history[-1].get("num_updates", 0)
