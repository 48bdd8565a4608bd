"""LR schedule ``cpt_cosine``: linear warm-up then cosine decay, re-warmed per stage (thesis 3.3).

    eta_t = eta_max * t / T_warmup                                              t <= T_warmup
    eta_t = eta_min + (eta_max - eta_min) / 2 * (1 + cos(pi * (t - T_warmup) / (T_end - T_warmup)))

with T_warmup = round(warmup_ratio * T_end) and T_end = ``optimization.max_update``; eta_t is
the rate after t updates. fairseq's own ``cosine`` scheduler differs: it restarts its cycle
at t = T_end (returning lr_shrink * eta_max there instead of eta_min) and, by default, warms up
from min_lr rather than 0; hence this one.
With ``min_lr`` equal to ``lr`` and no warm-up it is constant: the "no re-warming" ablation.
"""

import math
from dataclasses import dataclass, field
from typing import List

from fairseq.dataclass import FairseqDataclass
from fairseq.optim.lr_scheduler import FairseqLRScheduler, register_lr_scheduler
from omegaconf import II


@dataclass
class CptCosineConfig(FairseqDataclass):
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of max_update spent warming up"})
    min_lr: float = field(default=5e-5, metadata={"help": "eta_min, reached at max_update"})
    lr: List[float] = II("optimization.lr")
    max_update: int = II("optimization.max_update")


def cpt_cosine_lr(t: int, eta_max: float, eta_min: float, warmup: int, end: int) -> float:
    """The rate after ``t`` updates (module docstring)."""
    if t <= warmup:
        return eta_max * t / warmup if warmup > 0 else eta_max
    progress = min(t - warmup, end - warmup) / max(end - warmup, 1)
    return eta_min + (eta_max - eta_min) / 2 * (1 + math.cos(math.pi * progress))


@register_lr_scheduler("cpt_cosine", dataclass=CptCosineConfig)
class CptCosineSchedule(FairseqLRScheduler):
    def __init__(self, cfg: CptCosineConfig, optimizer):
        super().__init__(cfg, optimizer)
        if len(cfg.lr) != 1:
            raise ValueError(f"cpt_cosine takes one learning rate, got optimization.lr={list(cfg.lr)}")
        if cfg.max_update <= 0:
            raise ValueError("cpt_cosine needs optimization.max_update > 0 (it is T_end)")
        self.eta_max = cfg.lr[0]
        self.eta_min = cfg.min_lr
        self.end = cfg.max_update
        self.warmup = round(cfg.warmup_ratio * cfg.max_update)
        self.optimizer.set_lr(self.step_update(0))

    def step(self, epoch: int, val_loss: float | None = None) -> float:
        super().step(epoch, val_loss)
        return self.optimizer.get_lr()

    def step_update(self, num_updates: int) -> float:
        lr = cpt_cosine_lr(num_updates, self.eta_max, self.eta_min, self.warmup, self.end)
        self.optimizer.set_lr(lr)
        return lr
