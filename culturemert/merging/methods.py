"""Merge methods: what each adds to theta_pre, computed on one parameter tensor (thesis 3.4).

Task arithmetic: tau_i = theta_i - theta_pre and theta_merged = theta_pre + sum_i lambda_i tau_i
(thesis eq. 3.7; one shared lambda is eq. 3.8, lambda = 1/N weight averaging, eq. 3.9). TIES
(Yadav et al., 2023) and DARE (Yu et al., 2024), the interference-aware variants thesis 4.4 and
5.3 name as the next step, are settings of one generalised task arithmetic, as in mergekit: a
*sparsification* of each task vector (keep all, TIES' magnitude trim, DARE's random drop and
rescale), the weighting by lambda_i, and a *consensus* (the sum, or TIES' sign election with a
disjoint mean). A method is one small registered class; adding one is adding a class:

    @register
    class DareTies(GeneralTaskArithmetic):
        name = "dare_ties"

        @classmethod
        def configure(cls, density, seed):
            return cls(RandomDrop(check_density(density), seed), SignElection())

``taus`` stacks the N task vectors of (a slice of) one tensor: [N, *shape].
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from culturemert.errors import UserError

# The shared lambdas swept in thesis 4.4; 0.2 was best (CultureMERT-TA).
SWEEP_LAMBDAS = (0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0)

# Dtypes of half-precision saves: their task vectors are taken against the base rounded the same way.
HALF_PRECISION = (torch.float16, torch.bfloat16)


class MergeError(UserError):
    """Merge settings or a merge result that cannot be used; the message says why."""


def check_lambdas(lambdas: Sequence[float], models: int) -> list[float]:
    """One finite lambda per model."""
    if len(lambdas) != models:
        raise MergeError(f"{len(lambdas)} lambdas for {models} models")
    if bad := [value for value in lambdas if not math.isfinite(value)]:
        raise MergeError(f"lambdas must be finite numbers, got {', '.join(map(str, bad))}")
    return [float(value) for value in lambdas]


def check_density(density: float) -> float:
    """A TIES or DARE density: a fraction in (0, 1]."""
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}")
    return float(density)


def rounds_base(dtype: torch.dtype, base_dtype: torch.dtype) -> bool:
    """Whether a model tensor of ``dtype`` is a half-precision save of a base stored wider: its
    task vector is then taken against the base rounded to ``dtype``, so that the rounding of
    every weight (about 5e-4 relative in float16) is not counted as adaptation."""
    return dtype in HALF_PRECISION and base_dtype.is_floating_point and base_dtype.itemsize > dtype.itemsize


def task_vectors(theta_pre: torch.Tensor, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
    """tau_i = theta_i - theta_pre (thesis 3.4), stacked to [N, *shape], in float32 or wider so that
    the small differences of half-precision checkpoints survive; a half-precision theta_i is taken
    against theta_pre rounded to its dtype (``rounds_base``)."""
    dtype = torch.promote_types(theta_pre.dtype, torch.float32)
    base = theta_pre.to(dtype)

    def base_for(theta: torch.Tensor) -> torch.Tensor:
        return theta_pre.to(theta.dtype).to(dtype) if rounds_base(theta.dtype, theta_pre.dtype) else base

    return torch.stack([theta.to(dtype) - base_for(theta) for theta in thetas])


def cosine_similarity(gram: torch.Tensor) -> torch.Tensor:
    """cos(tau_i, tau_j) = G_ij / sqrt(G_ii G_jj) from Gram matrices G_ij = <tau_i, tau_j> [..., N, N]
    (thesis Fig. 4.5); 0 where a task vector is zero."""
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    scale = norms[..., :, None] * norms[..., None, :]
    return torch.where(scale > 0, gram / scale, 0.0)


def _per_task(values: Sequence[float] | torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """Per-task scalars shaped to broadcast against ``taus``."""
    values = torch.as_tensor(values, dtype=taus.dtype)
    return values.view(-1, *[1] * (taus.dim() - 1))


# --- Sparsifications: which entries of each task vector take part.


class Sparsification:
    """Keep every entry (plain task arithmetic)."""

    trim_density: float | None = None  # the density of a magnitude trim ``analyse`` must prepare

    def for_tensor(
        self, name: str, thresholds: torch.Tensor | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The sparsification of the task vectors of the tensor ``name``, slice by slice."""
        return lambda taus: taus

    def settings(self) -> dict:
        """What ``merge.json`` records of it."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


def magnitude_trim(taus: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """TIES' trim: tau_i where |tau_i| >= thresholds[i] (compared in float32), else 0."""
    return torch.where(taus.abs().to(torch.float32) >= _per_task(thresholds, taus), taus, 0)


@dataclass(frozen=True)
class MagnitudeTrim(Sparsification):
    """Keep the top ``density`` fraction of magnitudes of each whole task vector (TIES); the
    thresholds come from ``analyse(plan, density)`` (see ``MagnitudeThresholds``)."""

    density: float

    @property
    def trim_density(self) -> float:
        return self.density

    def for_tensor(
        self, name: str, thresholds: torch.Tensor | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        if thresholds is None:
            raise ValueError("a magnitude trim needs the thresholds of analyse(plan, density)")
        return lambda taus: magnitude_trim(taus, thresholds)


def random_drop(taus: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` (m ~ Bernoulli(density) drawn from
    ``generator``) and rescaled by 1/density: m * tau / density."""
    keep = torch.rand(taus.shape, generator=generator) < density
    return taus * keep / density


@dataclass(frozen=True)
class RandomDrop(Sparsification):
    """DARE's drop and rescale; the drops of a tensor are fixed by ``seed`` and its name, so every
    lambda of a sweep drops the same entries whatever the reading order."""

    density: float
    seed: int

    def for_tensor(
        self, name: str, thresholds: torch.Tensor | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        return lambda taus: random_drop(taus, self.density, generator)


# --- Consensus: how the weighted task vectors lambda_i t_i combine into one update.


class Consensus:
    """Their sum (task arithmetic, thesis eq. 3.7)."""

    def __call__(self, weighted: torch.Tensor) -> torch.Tensor:
        return weighted.sum(0)


class SignElection(Consensus):
    """TIES' elect and disjoint mean: gamma = sign(sum_i t_i) per parameter, the sign with the larger
    total mass; the mean of the t_i whose sign is gamma (0 where none is). With a shared lambda this
    is the paper's lambda * tau_m: lambda scales a mean, not a sum."""

    def __call__(self, weighted: torch.Tensor) -> torch.Tensor:
        agree = (torch.sign(weighted) == torch.sign(weighted.sum(0))) & (weighted != 0)
        return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


# --- The methods.


class GeneralTaskArithmetic:
    """theta_merged = theta_pre + consensus_i(lambda_i * sparsify(tau_i)). Subclasses name a method
    (``name``, registered with ``@register``) and build it from the command-line settings."""

    name: ClassVar[str]

    def __init__(self, sparsification: Sparsification | None = None, consensus: Consensus | None = None):
        self.sparsification = sparsification or Sparsification()
        self.consensus = consensus or Consensus()

    @classmethod
    def configure(cls, density: float, seed: int) -> GeneralTaskArithmetic:
        """The method with the user's ``density`` and ``seed`` where it has them."""
        raise NotImplementedError

    def update_for(
        self, name: str, lambdas: Sequence[float], thresholds: torch.Tensor | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The update added to theta_pre for the tensor ``name``, as a function of its task vectors
        (called slice by slice, in order)."""
        sparsify = self.sparsification.for_tensor(name, thresholds)
        return lambda taus: self.consensus(_per_task(lambdas, taus) * sparsify(taus))

    def settings(self) -> dict:
        """What ``merge.json`` records beside the method's name."""
        return self.sparsification.settings()


METHODS: dict[str, type[GeneralTaskArithmetic]] = {}


def register(method: type[GeneralTaskArithmetic]) -> type[GeneralTaskArithmetic]:
    """Make ``method`` available under its ``name`` (``--method`` of scripts/merge.py)."""
    METHODS[method.name] = method
    return method


def method_named(name: str, density: float = 0.2, seed: int = 0) -> GeneralTaskArithmetic:
    """The registered method ``name`` with the user's settings."""
    if name not in METHODS:
        raise MergeError(f"unknown merge method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name].configure(density, seed)


@register
class TaskArithmetic(GeneralTaskArithmetic):
    """sum_i lambda_i tau_i (thesis eq. 3.7-3.9)."""

    name = "task_arithmetic"

    @classmethod
    def configure(cls, density: float, seed: int) -> TaskArithmetic:
        return cls()


@register
class Ties(GeneralTaskArithmetic):
    """TIES-merging: magnitude trim at ``density``, sign election, disjoint mean."""

    name = "ties"

    @classmethod
    def configure(cls, density: float, seed: int) -> Ties:
        return cls(MagnitudeTrim(check_density(density)), SignElection())


@register
class Dare(GeneralTaskArithmetic):
    """DARE: random drop at keep rate ``density`` with rescaling, then task arithmetic."""

    name = "dare"

    @classmethod
    def configure(cls, density: float, seed: int) -> Dare:
        return cls(RandomDrop(check_density(density), seed))


def task_arithmetic(taus: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """The task-arithmetic update sum_i lambda_i tau_i (thesis eq. 3.7)."""
    return TaskArithmetic().update_for("", lambdas)(taus)


def ties(taus: torch.Tensor, lambdas: Sequence[float], thresholds: torch.Tensor) -> torch.Tensor:
    """The TIES update: trim at ``thresholds`` (one per task vector), elect, disjoint mean."""
    return SignElection()(_per_task(lambdas, taus) * magnitude_trim(taus, thresholds))


def dare(
    taus: torch.Tensor, lambdas: Sequence[float], density: float, generator: torch.Generator
) -> torch.Tensor:
    """The DARE update sum_i lambda_i m_i * tau_i / density, drops drawn from ``generator``;
    density 1 is task arithmetic."""
    return Consensus()(_per_task(lambdas, taus) * random_drop(taus, density, generator))
