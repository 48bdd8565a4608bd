"""Task ``mert_cpt``: one stage of MERT continual pre-training (thesis 3.3, SPEC §3).

It reads clip manifests (``{data}/{split}.tsv``) and, when given, EnCodec token caches
(``{tokens}/{split}/``), builds the teacher targets on the training device (CQT always, EnCodec
codes when no cache is given), applies the in-batch noise mixture to the training input, and
freezes every parameter that the stage's ``trainable`` patterns do not name. fairseq only
gives trainable parameters to the optimizer, so frozen ones carry no optimizer state.
"""

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from fairseq import metrics
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II

from culturemert.data.crops import CropDataset
from culturemert.data.manifest import read_manifest
from culturemert.data.noise_mixture import NoiseMixture
from culturemert.targets.cqt import CQTTeacher

logger = logging.getLogger(__name__)


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
    seed: int = II("common.seed")


@register_task("mert_cpt", dataclass=MertCptConfig)
class MertCptTask(FairseqTask):
    cfg: MertCptConfig

    def __init__(self, cfg: MertCptConfig):
        super().__init__(cfg)
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

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        sample = self.add_targets(sample, mix=True)
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad
        )
        logging_output["skipped_clips"] = sample.get("skipped", 0)
        return loss, sample_size, logging_output

    def valid_step(self, sample, model, criterion):
        return super().valid_step(self.add_targets(sample, mix=False), model, criterion)

    def reduce_metrics(self, logging_outputs, criterion) -> None:
        super().reduce_metrics(logging_outputs, criterion)
        skipped = sum(log.get("skipped_clips", 0) for log in logging_outputs)
        if skipped:
            metrics.log_scalar_sum("skipped_clips", skipped)

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
