"""The statistics pass: every input read once, non-finite values refused, task-vector Gram
matrices (norms, cosine similarity, thesis Fig. 4.5) and TIES' trim thresholds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from culturemert.checkpoint import non_finite, refuse_non_finite
from culturemert.merging.methods import check_density, cosine_similarity
from culturemert.merging.plan import MergePlan, layer_of, slices, visit
from culturemert.merging.thresholds import MagnitudeThresholds


@dataclass
class TaskVectorStats:
    """Gram matrices of the task vectors, ``gram[s, i, j] = <tau_i, tau_j>`` over scope ``scopes[s]``
    ("model", then "layer 0", ...), and TIES trim thresholds when asked for."""

    labels: list[str]
    scopes: list[str]
    gram: torch.Tensor
    thresholds: torch.Tensor | None = None

    @property
    def norms(self) -> torch.Tensor:
        """||tau_i|| over the whole model."""
        return self.gram[0].diagonal().sqrt()

    def cosine(self) -> torch.Tensor:
        """[scopes, N, N] cosine similarities (thesis Fig. 4.5)."""
        return cosine_similarity(self.gram)

    def norm_warning(self) -> str | None:
        """A warning when one task vector's norm differs from another's by more than 10x."""
        norms = self.norms
        if len(norms) < 2 or norms.max() <= 10 * norms.min():
            return None
        listing = ", ".join(f"{label} {norm:.4g}" for label, norm in zip(self.labels, norms.tolist()))
        return (
            f"task-vector norms differ by more than 10x ({listing}): the largest dominates the "
            "merge; consider per-model lambdas"
        )


def analyse(plan: MergePlan, trim_density: float | None = None) -> TaskVectorStats:
    """Read every input once: refuse non-finite values (``checkpoint.refuse_non_finite``), and
    accumulate the Gram matrices of the task vectors over the whole model and per transformer
    layer (norms, cosine similarity). With ``trim_density`` (TIES) a second pass fixes each task
    vector's trim threshold so that the top ``round(trim_density * n)`` of its n magnitudes are kept."""
    scopes = ["model"] + [f"layer {i}" for i in range(plan.base.cfg.encoder_layers)]
    gram = torch.zeros(len(scopes), len(plan.models), len(plan.models), dtype=torch.float64)
    selection = None
    if trim_density is not None:
        total = sum(plan.base.specs[name][0].numel() for name in plan.merged)
        selection = MagnitudeThresholds([round(check_density(trim_density) * total)] * len(plan.models))
    paths, found = [plan.base.path] + [model.path for model in plan.models], []

    def accumulate(name: str, theta_pre: torch.Tensor, thetas: list[torch.Tensor] | None) -> None:
        for path, tensor in zip(paths, [theta_pre, *(thetas or [])]):
            found.extend(f"{path}: {bad}" for bad in non_finite({name: tensor}))
        if thetas is None:
            return
        layer = layer_of(name)
        for _, taus in slices(theta_pre, thetas):
            product = (taus @ taus.T).double()
            gram[0] += product
            if layer is not None:
                gram[1 + layer] += product
            if selection is not None:
                selection.add(taus)

    visit(plan, plan.merged + plan.copied, accumulate)
    refuse_non_finite(found)
    thresholds = None
    if selection is not None:
        selection.end_first_pass()

        def count(name: str, theta_pre: torch.Tensor, thetas: list[torch.Tensor]) -> None:
            for _, taus in slices(theta_pre, thetas):
                selection.add(taus)

        visit(plan, plan.merged, count)
        thresholds = selection.thresholds()
    return TaskVectorStats(plan.labels, scopes, gram, thresholds)
