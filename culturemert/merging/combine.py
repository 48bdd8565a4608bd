"""The merge pass: theta_pre + update(tau_1, ..., tau_N) for every merged tensor (thesis eq. 3.7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from culturemert.checkpoint import fresh_heads
from culturemert.errors import listing
from culturemert.merging.methods import GeneralTaskArithmetic, MergeError, check_lambdas, method_named
from culturemert.merging.plan import MergePlan, slices, visit


def _empty_state(specs: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of ``specs``, carved out of one allocation: the long-lived merged state
    then does not interleave on the heap with the short-lived scratch tensors of the maths, which
    (measured with glibc) kept about 0.6x a checkpoint of freed scratch memory resident."""
    offsets, total = {}, 0
    for name, (shape, dtype) in specs.items():
        offsets[name] = total
        total += -(-shape.numel() * dtype.itemsize // 64) * 64  # 64-byte aligned
    storage = torch.empty(total, dtype=torch.uint8)
    return {
        name: storage[offsets[name] : offsets[name] + shape.numel() * dtype.itemsize].view(dtype).view(shape)
        for name, (shape, dtype) in specs.items()
    }


def merge(
    plan: MergePlan,
    lambdas: Sequence[float],
    method: str | GeneralTaskArithmetic = "task_arithmetic",
    density: float = 0.2,
    seed: int = 0,
    thresholds: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The merged fairseq state dict: theta_pre + update(tau_1, ..., tau_N) for each merged tensor,
    in the base's dtype, one finite lambda per model (thesis eq. 3.7). ``method``: a method object or
    the name of a registered one, built with ``density`` and ``seed`` (``ties`` needs the
    ``thresholds`` of ``analyse(plan, density)``). Copied tensors are the base's; fresh heads are
    drawn from ``seed``. A merged tensor that overflows to inf is refused (`MergeError`).
    Memory: the merged state, plus about ``CHUNK_BYTES`` of each input at a time."""
    method = method_named(method, density, seed) if isinstance(method, str) else method
    lambdas = check_lambdas(lambdas, len(plan.models))
    if method.sparsification.trim_density is not None and thresholds is None:
        raise ValueError(f"{method.name} needs the trim thresholds of analyse(plan, density)")
    heads = {}
    if plan.fresh_heads:
        heads = fresh_heads(plan.base.cfg, seed)
    state, overflowed = _empty_state(plan.base.specs), []

    def combine(name: str, theta_pre: torch.Tensor, thetas: list[torch.Tensor] | None) -> None:
        if thetas is None:
            state[name].copy_(theta_pre)
            return
        merged, update_of = state[name].view(-1), method.update_for(name, lambdas, thresholds)
        for part, taus in slices(theta_pre, thetas):
            update = update_of(taus)
            merged[part] = theta_pre.reshape(-1)[part].to(update.dtype) + update
        if not torch.isfinite(merged).all():
            overflowed.append(name)

    visit(plan, list(plan.base.specs), combine)
    if overflowed:
        raise MergeError(
            f"the merge overflowed to non-finite values in {listing(overflowed)}; nothing was written; "
            "use smaller lambdas"
        )
    return {**state, **heads}
