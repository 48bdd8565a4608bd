"""``merge.json``: how a merged model was made (inputs, method, settings, heads, rounding)."""

from __future__ import annotations

from collections.abc import Sequence

from culturemert.merging.methods import GeneralTaskArithmetic
from culturemert.merging.plan import MergePlan


def merge_record(plan: MergePlan, lambdas: Sequence[float], method: GeneralTaskArithmetic, seed: int) -> dict:
    """Inputs, method and its settings (``method.settings()``), where the heads came from (and the
    seed of fresh ones), and which half-precision tensors had their task vectors taken against the
    base rounded to their dtype (``rounded_base``: model -> dtype -> tensor names)."""
    record = {
        "method": method.name,
        "base": str(plan.base.path),
        "models": [str(model.path) for model in plan.models],
        "lambdas": [float(value) for value in lambdas],
        "heads": "fresh" if plan.fresh_heads else "base" if plan.backbone_only else "merged",
        **method.settings(),
    }
    if plan.fresh_heads:
        record["seed"] = seed
    if plan.rounded:
        record["rounded_base"] = plan.rounded
    return record
