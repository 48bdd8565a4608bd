"""The streaming plan of a merge: what is merged and what copied, refusals before any tensor is
read, and the reading of the inputs a few tensors at a time.

Inputs are mapped, not loaded (``torch.load(mmap=True)``, ``safe_open``), and read ``CHUNK_BYTES``
of tensors at a time; a chunk's file pages leave memory when it is dropped, so only the merged
state is ever held whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from culturemert.checkpoint import DERIVED_PREFIXES, CheckpointError, Specs, check_state
from culturemert.errors import listing
from culturemert.hf_format import HEAD_PREFIXES
from culturemert.merging.methods import rounds_base, task_vectors
from culturemert.merging.sources import Source, labels
from culturemert.models.config import MertConfig

# Bytes of tensors read from each input at a time: bounds the file pages resident beside the merged
# state. Elements of one tensor the per-element maths works on at a time: bounds its scratch memory.
CHUNK_BYTES = 32 * 2**20
SLICE_ELEMENTS = 2**18


@dataclass
class MergePlan:
    """Validated inputs and the split of the base's tensors.

    ``merged``: floating-point tensors, theta_pre + update(task vectors); ``copied``: taken from the
    base (integer and derived buffers; the pre-training heads when ``backbone_only``);
    ``fresh_heads``: the base is an HF folder, so the heads are newly initialised; ``notes``: what
    the user should be told about these choices; ``rounded``: per model, the half-precision
    tensors whose task vectors are taken against the base rounded to their dtype
    (``methods.rounds_base``), by dtype.
    """

    base: Source
    models: list[Source]
    merged: list[str]
    copied: list[str]
    backbone_only: bool
    fresh_heads: bool
    notes: list[str]
    rounded: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return labels(self.models)


def _architecture(cfg: MertConfig, with_heads: bool) -> dict:
    return {**cfg.architecture(heads=with_heads), "conv_feature_layers": cfg.conv_layers}


def _differences(label: str, specs: Specs, expected: Specs) -> list[str]:
    """Missing and extra names, and shape and dtype mismatches with the base (a half-precision
    save of a wider base tensor is not a mismatch)."""
    problems = []
    missing, extra = sorted(set(expected) - set(specs)), sorted(set(specs) - set(expected))
    if missing:
        problems.append(f"{label}: missing keys: {listing(missing)}")
    if extra:
        problems.append(f"{label}: extra keys: {listing(extra)}")
    for name in sorted(set(specs) & set(expected)):
        (shape, dtype), (expected_shape, expected_dtype) = specs[name], expected[name]
        if shape != expected_shape:
            problems.append(f"{label}: {name} has shape {tuple(shape)}, the base {tuple(expected_shape)}")
        elif dtype != expected_dtype and not rounds_base(dtype, expected_dtype):
            problems.append(f"{label}: {name} is {dtype}, the base {expected_dtype}")
    return problems


def plan_merge(base: Source, models: Sequence[Source], backbone_only: bool = False) -> MergePlan:
    """Check that ``models`` can be merged onto ``base`` and decide what each tensor becomes.

    Refuses (``CheckpointError``, every problem listed) different architectures, a base that does
    not fit a MERT model of its own config (``checkpoint.check_state``), and models with missing or
    extra keys or a shape or dtype different from the base's (half-precision saves of a wider base
    aside). An HF input has no heads to merge: ``backbone_only`` is then implied, with a note.
    """
    if not models:
        raise CheckpointError("nothing to merge: pass at least one model")
    notes = []
    hf_inputs = [str(source.path) for source in (base, *models) if source.is_hf]
    if hf_inputs and not backbone_only:
        backbone_only = True
        notes.append(
            f"{listing(hf_inputs)}: HF folders carry no pre-training heads, so only the backbone "
            "is merged (as with --backbone-only)"
        )
    if backbone_only:
        notes.append(
            "the pre-training heads are freshly initialised: the base is an HF folder"
            if base.is_hf
            else f"the pre-training heads are copied from the base {base.path}"
        )

    reference = _architecture(base.cfg, with_heads=not backbone_only)
    differences = [
        f"{model.path}: {name} {value!r}, the base {reference[name]!r}"
        for model in models
        for name, value in _architecture(model.cfg, with_heads=not backbone_only).items()
        if value != reference[name]
    ]
    if differences:
        raise CheckpointError("different architectures cannot be merged:\n  " + "\n  ".join(differences))
    check_state(base.path, base.cfg, base.specs, heads=not base.is_hf)

    def in_scope(name: str) -> bool:
        is_head = name.startswith(HEAD_PREFIXES)
        return not name.startswith(DERIVED_PREFIXES) and not (backbone_only and is_head)

    scope = {name: spec for name, spec in base.specs.items() if in_scope(name)}
    problems, heads_differ = [], False
    for model in models:
        specs = {name: spec for name, spec in model.specs.items() if in_scope(name)}
        problems += _differences(str(model.path), specs, scope)
        heads_differ |= any(name.startswith(HEAD_PREFIXES) for name in set(specs) ^ set(scope))
    if heads_differ:
        problems.append("(to merge the backbones and keep the base's heads, pass --backbone-only)")
    if problems:
        raise CheckpointError("cannot merge:\n  " + "\n  ".join(problems))

    merged = [name for name, (_, dtype) in scope.items() if dtype.is_floating_point]
    copied = [name for name in base.specs if name not in merged]
    rounded = {}
    for model in models:
        by_dtype: dict[str, list[str]] = {}
        for name in merged:
            dtype = model.specs[name][1]
            if rounds_base(dtype, base.specs[name][1]):
                by_dtype.setdefault(str(dtype).removeprefix("torch."), []).append(name)
        if by_dtype:
            rounded[str(model.path)] = by_dtype
            notes.append(
                f"{model.path}: {sum(map(len, by_dtype.values()))} tensors saved in "
                f"{' and '.join(by_dtype)}: their task vectors are taken against the base rounded alike"
            )
    return MergePlan(
        base, list(models), merged, copied, backbone_only, base.is_hf and backbone_only, notes, rounded
    )


def visit(
    plan: MergePlan,
    names: Sequence[str],
    visitor: Callable[[str, torch.Tensor, list[torch.Tensor] | None], None],
) -> None:
    """Call ``visitor(name, theta_pre, [theta_1, ..., theta_N])`` for ``names`` in order, the models'
    list None for copied tensors. Inputs are read in runs of about ``CHUNK_BYTES`` each, and a run's
    file pages are released before the next is read: ``visitor`` must copy whatever it keeps."""
    runs, run, size = [], [], 0
    for name in names:
        shape, dtype = plan.base.specs[name]
        if run and size + shape.numel() * dtype.itemsize > CHUNK_BYTES:
            runs.append(run)
            run, size = [], 0
        run.append(name)
        size += shape.numel() * dtype.itemsize
    runs += [run] if run else []
    merged = set(plan.merged)
    for run in runs:
        base = plan.base.read(run)
        models = [model.read([name for name in run if name in merged]) for model in plan.models]
        for name in run:
            visitor(name, base[name], [model[name] for model in models] if name in merged else None)
        del base, models  # before the next run is read


def slices(theta_pre: torch.Tensor, thetas: list[torch.Tensor]) -> Iterator[tuple[slice, torch.Tensor]]:
    """(positions, task vectors [N, length]) along the flattened tensor, ``SLICE_ELEMENTS`` at a time,
    so that the element-wise maths works on a few MiB whatever the tensor's size."""
    flat_pre, flats = theta_pre.reshape(-1), [theta.reshape(-1) for theta in thetas]
    for start in range(0, flat_pre.numel(), SLICE_ELEMENTS):
        part = slice(start, start + SLICE_ELEMENTS)
        yield part, task_vectors(flat_pre[part], [flat[part] for flat in flats])


def layer_of(name: str) -> int | None:
    """The transformer layer a parameter belongs to, or None."""
    match = re.match(r"encoder\.layers\.(\d+)\.", name)
    return int(match[1]) if match else None
