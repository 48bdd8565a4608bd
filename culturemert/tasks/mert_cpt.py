"""Task ``mert_cpt``: one stage of MERT continual pre-training (thesis 3.3).

It reads clip manifests (``{data}/{split}.tsv``) and, when given, EnCodec token caches
(``{tokens}/{split}/``), builds the teacher targets on the training device (CQT always, EnCodec
codes when no cache is given), applies the in-batch noise mixture to the training input, and
freezes every parameter that the stage's ``trainable`` patterns do not name. fairseq only
gives trainable parameters to the optimizer, so frozen ones carry no optimizer state.

``task.bf16_autocast`` runs the model's forward under bfloat16 autocast with float32 weights
(fairseq's ``common.bf16`` would cast the weights themselves); the teachers run before it and the
loss heads outside it, in float32. It excludes ``common.fp16``, ``common.amp`` and ``common.bf16``.
The training step reports the peak CUDA memory allocated since fairseq's last reset (every update)
as ``cuda_peak_gib`` in single-process runs.

Started by the launcher (``CULTUREMERT_DIE_WITH`` set), every training process is killed when the
process that started it ends (Linux), so none outlives the run lock: torchrun's workers do not
inherit it.
"""

import ctypes
import logging
import os
import re
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from fairseq import metrics
from fairseq.dataclass import FairseqDataclass
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from culturemert.data.crops import CropDataset
from culturemert.data.manifest import read_manifest
from culturemert.data.noise_mixture import NoiseMixture
from culturemert.errors import UserError
from culturemert.targets.cqt import CQTTeacher

logger = logging.getLogger(__name__)

DIE_WITH = "CULTUREMERT_DIE_WITH"  # <launcher pid>@<host>, set by culturemert.training.launcher
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Under the launcher (`DIE_WITH` set), on Linux: have this process killed when its parent
    ends, and exit at once if its parent or the launcher on this host has already ended."""
    launcher = os.environ.get(DIE_WITH)
    if not launcher or os.uname().sysname != "Linux":
        return
    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("could not tie this process to its parent: %s", os.strerror(ctypes.get_errno()))
        return
    pid, _, host = launcher.partition("@")
    gone = os.getppid() != parent or parent == 1
    if not gone and host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            gone = True
        except (PermissionError, ValueError):
            pass
    if gone:
        logger.error("the process that started this one has ended; exiting")
        os._exit(1)


@dataclass
class MertCptConfig(FairseqDataclass):
    data: str = field(default="???", metadata={"help": "folder with the {split}.tsv manifests"})
    tokens: Optional[str] = field(
        default=None, metadata={"help": "folder with one EnCodec token cache per split ({tokens}/{split})"}
    )
    encodec_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "EnCodec 24 kHz weights, to compute codes on the fly when 'tokens' is unset"},
    )
    crop_samples: int = field(default=120000, metadata={"help": "crop length (5 s at 24 kHz)"})
    min_sample_size: int = field(default=72000, metadata={"help": "clips shorter than this are dropped"})
    skip_bad_audio: bool = field(
        default=False,
        metadata={"help": "leave unreadable clips out of their batch (logged) instead of failing"},
    )
    mixup_prob: float = field(
        default=NoiseMixture.prob, metadata={"help": "probability of noise mixture per clip"}
    )
    mixup_max_segments: int = field(
        default=NoiseMixture.max_segments, metadata={"help": "at most this many mixed-in segments"}
    )
    mixup_min_length: int = field(
        default=NoiseMixture.min_length, metadata={"help": "shortest mixed-in segment (samples)"}
    )
    mixup_max_length: int = field(
        default=NoiseMixture.max_length, metadata={"help": "longest mixed-in segment (samples)"}
    )
    trainable: str = field(
        default=".*",
        metadata={
            "help": "comma-separated regexes of the parameter names this stage trains; all others are "
            "frozen (stage 1: 'feature_extractor\\..*,label_embs_concat'; stage 2: '.*')"
        },
    )
    bf16_autocast: bool = field(
        default=False,
        metadata={
            "help": "bfloat16 autocast of the model's forward with float32 weights, teachers and loss "
            "(an alternative to common.fp16/common.amp, which must then be off)"
        },
    )
    seed: int = II("common.seed")
    common_fp16: bool = II("common.fp16")
    common_amp: bool = II("common.amp")
    common_bf16: bool = II("common.bf16")


@register_task("mert_cpt", dataclass=MertCptConfig)
class MertCptTask(FairseqTask):
    cfg: MertCptConfig

    def __init__(self, cfg: MertCptConfig):
        super().__init__(cfg)
        if cfg.bf16_autocast:
            # Unresolved interpolations (a config built outside Hydra) are strings, not True.
            names = ("fp16", "amp", "bf16")
            other = [f"common.{name}" for name in names if getattr(cfg, f"common_{name}") is True]
            if other:
                raise UserError(
                    f"task.bf16_autocast=true and {' and '.join(other)}=true exclude each other: "
                    f"set {'=false '.join(other)}=false for bfloat16 autocast, or drop task.bf16_autocast"
                )
        self.mixture = NoiseMixture(
            cfg.mixup_prob, cfg.mixup_max_segments, cfg.mixup_min_length, cfg.mixup_max_length
        )
        self.cqt = CQTTeacher()
        self.encodec = None
        if cfg.tokens is None:
            if cfg.encodec_checkpoint is None:
                raise ValueError(
                    "task.tokens is unset and so is task.encodec_checkpoint: give a token cache "
                    "folder (scripts/extract_tokens.py) or the EnCodec weights to compute codes on the fly"
                )
            from culturemert.targets.encodec_teacher import EncodecTeacher

            self.encodec = EncodecTeacher.from_checkpoint(cfg.encodec_checkpoint)

    @classmethod
    def setup_task(cls, cfg: MertCptConfig, **kwargs) -> "MertCptTask":
        die_with_parent()
        return cls(cfg)

    def build_model(self, cfg, from_checkpoint: bool = False):
        return self.freeze_for_stage(super().build_model(cfg, from_checkpoint))

    def freeze_for_stage(self, model: torch.nn.Module) -> torch.nn.Module:
        """Train only the parameters named by ``task.trainable`` (thesis 3.3); log the counts."""
        patterns = [re.compile(p.strip()) for p in self.cfg.trainable.split(",") if p.strip()]
        trainable = frozen = 0
        for name, parameter in model.named_parameters():
            parameter.requires_grad = any(p.fullmatch(name) for p in patterns)
            if parameter.requires_grad:
                trainable += parameter.numel()
            else:
                frozen += parameter.numel()
        if trainable == 0:
            raise ValueError(f"task.trainable={self.cfg.trainable!r} matches no parameter of the model")
        logger.info(
            "stage parameters: %d trainable, %d frozen (trainable patterns: %s)",
            trainable,
            frozen,
            self.cfg.trainable,
        )
        return model

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs) -> None:
        manifest = read_manifest(Path(self.cfg.data) / f"{split}.tsv")
        token_cache = None
        if self.cfg.tokens is not None:
            from culturemert.targets.token_cache import TokenCache

            token_cache = TokenCache.open(Path(self.cfg.tokens) / split, manifest)
        self.datasets[split] = CropDataset(
            manifest,
            crop_samples=self.cfg.crop_samples,
            min_samples=self.cfg.min_sample_size,
            token_cache=token_cache,
            seed=self.cfg.seed,
            skip_bad_audio=self.cfg.skip_bad_audio,
        )

    @torch.no_grad()
    def add_targets(self, sample: dict, mix: bool) -> dict:
        """Teacher targets from the clean crops, then (``mix``) the noise mixture on the input."""
        source = sample["net_input"]["source"]
        padding_mask = sample["net_input"]["padding_mask"]
        self.cqt.to(source.device)
        sample["cqt"] = self.cqt(source)
        if self.encodec is not None:
            self.encodec.to(source.device)
            sample["codes"] = self.encodec.codes(source.float())
        if mix:
            sample["net_input"]["source"] = self.mixture(source, padding_mask)
        return sample

    def autocast(self, sample: dict, optimizer=None) -> torch.autocast:
        """The autocast context of the forward: bfloat16 with ``task.bf16_autocast``, else
        fairseq's FP16 autocast when ``common.amp`` made ``optimizer`` an ``AMPOptimizer``."""
        if self.cfg.bf16_autocast:
            return torch.autocast(sample["net_input"]["source"].device.type, dtype=torch.bfloat16)
        return torch.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer))

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's training step with the teachers first and autocast around the forward only."""
        sample = self.add_targets(sample, mix=True)
        model.train()
        model.set_num_updates(update_num)
        with self.autocast(sample, optimizer):
            loss, sample_size, logging_output = criterion(model, sample)
        if ignore_grad:
            loss *= 0
        optimizer.backward(loss)
        logging_output["skipped_clips"] = sample.get("skipped", 0)
        if sample["net_input"]["source"].is_cuda and not torch.distributed.is_initialized():
            logging_output["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return loss, sample_size, logging_output

    def valid_step(self, sample, model, criterion):
        sample = self.add_targets(sample, mix=False)
        with self.autocast(sample):
            return super().valid_step(sample, model, criterion)

    def reduce_metrics(self, logging_outputs, criterion) -> None:
        super().reduce_metrics(logging_outputs, criterion)
        skipped = sum(log.get("skipped_clips", 0) for log in logging_outputs)
        if skipped:
            metrics.log_scalar_sum("skipped_clips", skipped)
        peaks = [log["cuda_peak_gib"] for log in logging_outputs if "cuda_peak_gib" in log]
        if peaks:
            metrics.log_scalar("cuda_peak_gib", max(peaks), weight=0, round=2)

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
