"""Merging culture-specialised MERT models in weight space (thesis 3.4, 4.4; SPEC §4).

Task arithmetic: tau_i = theta_i - theta_pre and theta_merged = theta_pre + sum_i lambda_i tau_i
(thesis eq. 3.7); one shared lambda is eq. 3.8, lambda = 1/N is weight averaging (eq. 3.9).
TIES (Yadav et al., 2023) and DARE (Yu et al., 2024) are interference-aware variants of the
kind thesis 4.4 and 5.3 name as the next step.

Merging streams: inputs are opened lazily (fairseq ``.pt`` files through ``torch.load(mmap=True)``,
HF folders through ``safe_open``) and read ``CHUNK_BYTES`` of tensors at a time; a chunk's file
pages leave memory when it is dropped, so only the merged state is ever held whole.
Pipeline: ``open_source`` -> ``plan_merge`` -> ``analyse`` -> ``merge`` -> ``write_merged``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from culturemert.checkpoint import (
    DERIVED_PREFIXES,
    CheckpointError,
    fresh_heads,
    read_checkpoint,
    read_fairseq,
    save_fairseq,
    save_hf,
)
from culturemert.hf_format import HEAD_PREFIXES, hf_key_to_fairseq, mert_config_from_hf
from culturemert.models.mert import MertConfig, MertModel

METHODS = ("task_arithmetic", "ties", "dare")

# The shared lambdas swept in thesis 4.4; 0.2 was best (CultureMERT-TA).
SWEEP_LAMBDAS = (0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0)


# Bytes of tensors read from each input at a time: bounds the file pages resident beside the merged
# state. Elements of one tensor the per-element maths works on at a time: bounds its scratch memory.
CHUNK_BYTES = 32 * 2**20
SLICE_ELEMENTS = 2**18

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# --- The merging maths, on one parameter tensor; ``taus`` stacks the N task vectors [N, *shape].


def task_vectors(theta_pre: torch.Tensor, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
    """tau_i = theta_i - theta_pre (thesis 3.4), stacked to [N, *shape], in float32 or wider so that
    the small differences of half-precision checkpoints survive."""
    dtype = torch.promote_types(theta_pre.dtype, torch.float32)
    base = theta_pre.to(dtype)
    return torch.stack([theta.to(dtype) - base for theta in thetas])


def _per_task(values: Sequence[float] | torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """Per-task scalars shaped to broadcast against ``taus``."""
    values = torch.as_tensor(values, dtype=taus.dtype)
    return values.view(-1, *[1] * (taus.dim() - 1))


def task_arithmetic(taus: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """The update sum_i lambda_i tau_i that task arithmetic adds to theta_pre (thesis eq. 3.7; eq. 3.8
    for a shared lambda, weight averaging for lambda = 1/N, eq. 3.9)."""
    return (_per_task(lambdas, taus) * taus).sum(0)


def ties(taus: torch.Tensor, lambdas: Sequence[float], thresholds: torch.Tensor) -> torch.Tensor:
    """The TIES-merging update (Yadav et al., 2023) added to theta_pre:

    trim: t_i = lambda_i tau_i where |tau_i| >= thresholds[i] (compared in float32; a threshold
    keeps the top ``density`` fraction of magnitudes of the whole task vector i, see
    ``MagnitudeThresholds``), else 0;
    elect: gamma = sign(sum_i t_i) per parameter, the sign with the larger total mass;
    disjoint mean: the mean of the t_i whose sign is gamma (0 where none is).
    With a shared lambda this is the paper's lambda * tau_m: lambda scales a mean, not a sum.
    """
    magnitudes = taus.abs().to(torch.float32)
    kept = torch.where(magnitudes >= _per_task(thresholds, magnitudes), taus, 0) * _per_task(lambdas, taus)
    agree = (torch.sign(kept) == torch.sign(kept.sum(0))) & (kept != 0)
    return (kept * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare(
    taus: torch.Tensor, lambdas: Sequence[float], density: float, generator: torch.Generator
) -> torch.Tensor:
    """The DARE update (Yu et al., 2024): drop each entry of each tau_i with probability 1 - density
    and rescale the rest by 1/density, then task arithmetic: sum_i lambda_i m_i * tau_i / density
    with m_i ~ Bernoulli(density) drawn from ``generator``. density 1 is task arithmetic."""
    keep = torch.rand(taus.shape, generator=generator) < density
    return task_arithmetic(taus * keep / density, lambdas)


def cosine_similarity(gram: torch.Tensor) -> torch.Tensor:
    """cos(tau_i, tau_j) = G_ij / sqrt(G_ii G_jj) from Gram matrices G_ij = <tau_i, tau_j> [..., N, N]
    (thesis Fig. 4.5); 0 where a task vector is zero."""
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    scale = norms[..., :, None] * norms[..., None, :]
    return torch.where(scale > 0, gram / scale, 0.0)


class MagnitudeThresholds:
    """Each task vector's k_i-th largest magnitude, exact, from two streamed passes (TIES' trim).

    Radix selection on float32 bit patterns, which order as the values do for x >= 0: the first
    pass counts the upper 16 bits and finds the bucket holding the k-th largest magnitude, the
    second counts the lower 16 bits inside that bucket. Memory: two 65,536-bin counts per task.
    Call ``add`` on every tensor's task vectors, ``end_first_pass``, ``add`` on all again, then
    ``thresholds``.
    """

    def __init__(self, ks: Sequence[int]):
        self.ks = torch.tensor(ks, dtype=torch.int64)
        self.high = torch.zeros(len(ks), 1 << 16, dtype=torch.int64)
        self.low = torch.zeros_like(self.high)
        self.bucket: torch.Tensor | None = None
        self.rank: torch.Tensor | None = None

    def add(self, taus: torch.Tensor) -> None:
        """Count the magnitudes of one tensor's task vectors ``taus`` [N, ...]."""
        bits = taus.abs().to(torch.float32).view(torch.int32).reshape(len(self.ks), -1)
        for i, row in enumerate(bits):
            if self.bucket is None:
                self.high[i] += torch.bincount(row >> 16, minlength=1 << 16)
            else:
                inside = row[(row >> 16) == self.bucket[i]]
                self.low[i] += torch.bincount(inside & 0xFFFF, minlength=1 << 16)

    def end_first_pass(self) -> None:
        self.bucket, self.rank = _select(self.high, self.ks)

    def thresholds(self) -> torch.Tensor:
        """float32 [N]: TIES keeps |tau_i| >= thresholds[i] (k_i or more entries, more on ties);
        +inf where k_i = 0."""
        low, _ = _select(self.low, self.rank)
        values = ((self.bucket << 16) | low).to(torch.int32).view(torch.float32)
        return torch.where(self.ks > 0, values, torch.inf)


def _select(counts: torch.Tensor, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of bucket ``counts`` [N, B]: the bucket holding the k-th largest element, and that
    element's rank from the top among the bucket's elements."""
    at_or_above = counts.flip(1).cumsum(1).flip(1)
    bucket = ((at_or_above >= ks[:, None]).sum(1) - 1).clamp(min=0)
    above = at_or_above.gather(1, bucket[:, None])[:, 0] - counts.gather(1, bucket[:, None])[:, 0]
    return bucket, ks - above


# --- Inputs, read lazily.


@dataclass
class Source:
    """A merge input. ``specs`` maps fairseq parameter names to (shape, dtype); ``read`` loads a few
    tensors at a time. HF folders carry the backbone only (no pre-training heads)."""

    path: Path
    cfg: MertConfig
    specs: dict[str, tuple[torch.Size, torch.dtype]]
    is_hf: bool
    trust: bool = False
    file_keys: dict[str, str] = field(default_factory=dict)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, backed by a mapping of the file where the format allows (pages read
        on first touch); the memory they take is released when the last of them is dropped."""
        if self.is_hf:
            with safe_open(self.path / "model.safetensors", framework="pt") as tensors:
                return {name: tensors.get_tensor(self.file_keys[name]) for name in names}
        state = read_checkpoint(self.path, self.trust, mmap=True)["model"]
        return {name: state[name] for name in names}


def open_source(path: str | os.PathLike, trust: bool = False) -> Source:
    """Open a fairseq ``.pt`` (``trust``: unpickle without the allow-list) or an HF folder, reading
    its configuration and tensor names, shapes and dtypes but no tensor data."""
    path = Path(path)
    if path.is_dir():
        return _open_hf(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or HF folder")
    cfg, state = read_fairseq(path, trust, mmap=True)
    specs = {name: (tensor.shape, tensor.dtype) for name, tensor in state.items()}
    return Source(path, cfg, specs, is_hf=False, trust=trust)


def _open_hf(folder: Path) -> Source:
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise CheckpointError(f"{folder}: missing {needed.name}; expected an HF model folder")
    try:
        cfg = mert_config_from_hf(json.loads(config_path.read_text()), str(folder))
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{config_path}: not a MERT configuration ({error})") from None
    specs, file_keys, unknown = {}, {}, []
    with safe_open(weights_path, framework="pt") as tensors:
        for key in tensors.keys():
            name = hf_key_to_fairseq(key)
            view = tensors.get_slice(key)
            if name is None or view.get_dtype() not in _SAFETENSORS_DTYPES:
                unknown.append(key)
                continue
            specs[name] = (torch.Size(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()])
            file_keys[name] = key
    if unknown:
        raise CheckpointError(
            f"{weights_path}: tensors that are not part of a MERT backbone: " + _listing(unknown)
        )
    return Source(folder, cfg, specs, is_hf=True, file_keys=file_keys)


# --- Planning: what is merged, what is copied, and refusals before any tensor is read.


def _listing(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _labels(sources: Sequence[Source]) -> list[str]:
    """Short names for reports: file stems or folder names, full paths when those collide."""
    names = [source.path.name if source.is_hf else source.path.stem for source in sources]
    return names if len(set(names)) == len(names) else [str(source.path) for source in sources]


def _architecture(cfg: MertConfig, with_heads: bool) -> dict:
    return {**cfg.architecture(heads=with_heads), "conv_feature_layers": cfg.conv_layers}


def _differences(label: str, specs: dict, expected: dict, reference: str, dtypes: bool) -> list[str]:
    """Missing and extra names, and shape (and, with ``dtypes``, dtype) mismatches."""
    problems = []
    missing, extra = sorted(set(expected) - set(specs)), sorted(set(specs) - set(expected))
    if missing:
        problems.append(f"{label}: missing keys: {_listing(missing)}")
    if extra:
        problems.append(f"{label}: extra keys: {_listing(extra)}")
    for name in sorted(set(specs) & set(expected)):
        (shape, dtype), (expected_shape, expected_dtype) = specs[name], expected[name]
        if shape != expected_shape:
            problems.append(f"{label}: {name} has shape {tuple(shape)}, {reference} {tuple(expected_shape)}")
        elif dtypes and dtype != expected_dtype:
            problems.append(f"{label}: {name} is {dtype}, {reference} {expected_dtype}")
    return problems


@dataclass
class MergePlan:
    """Validated inputs and the split of the base's tensors.

    ``merged``: floating-point tensors, theta_pre + update(task vectors); ``copied``: taken from the
    base (integer and derived buffers; the pre-training heads when ``backbone_only``);
    ``fresh_heads``: the base is an HF folder, so the heads are newly initialised; ``notes``: what
    the user should be told about these choices.
    """

    base: Source
    models: list[Source]
    merged: list[str]
    copied: list[str]
    backbone_only: bool
    fresh_heads: bool
    notes: list[str]

    @property
    def labels(self) -> list[str]:
        return _labels(self.models)


def plan_merge(base: Source, models: Sequence[Source], backbone_only: bool = False) -> MergePlan:
    """Check that ``models`` can be merged onto ``base`` and decide what each tensor becomes.

    Refuses (``CheckpointError``, every problem listed) different architectures, a base that does
    not fit a MERT model of its own config, and models with missing or extra keys or a shape or
    dtype different from the base's. An HF input has no heads to merge: ``backbone_only`` is then
    implied, with a note.
    """
    if not models:
        raise CheckpointError("nothing to merge: pass at least one model")
    notes = []
    hf_inputs = [str(source.path) for source in (base, *models) if source.is_hf]
    if hf_inputs and not backbone_only:
        backbone_only = True
        notes.append(
            f"{_listing(hf_inputs)}: HF folders carry no pre-training heads, so only the backbone "
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

    def in_scope(name: str) -> bool:
        is_head = name.startswith(HEAD_PREFIXES)
        return not name.startswith(DERIVED_PREFIXES) and not (backbone_only and is_head)

    with torch.device("meta"):
        expected = {name: (t.shape, t.dtype) for name, t in MertModel(base.cfg).state_dict().items()}
    if base.is_hf:
        expected = {name: spec for name, spec in expected.items() if not name.startswith(HEAD_PREFIXES)}
    base_specs = {name: spec for name, spec in base.specs.items() if not name.startswith(DERIVED_PREFIXES)}
    problems = _differences(str(base.path), base_specs, expected, "a model of its config", dtypes=False)
    scope = {name: spec for name, spec in base.specs.items() if in_scope(name)}
    heads_differ = False
    for model in models:
        specs = {name: spec for name, spec in model.specs.items() if in_scope(name)}
        problems += _differences(str(model.path), specs, scope, "the base", dtypes=True)
        heads_differ |= any(name.startswith(HEAD_PREFIXES) for name in set(specs) ^ set(scope))
    if heads_differ:
        problems.append("(to merge the backbones and keep the base's heads, pass --backbone-only)")
    if problems:
        raise CheckpointError("cannot merge:\n  " + "\n  ".join(problems))

    merged = [name for name, (_, dtype) in scope.items() if dtype.is_floating_point]
    copied = [name for name in base.specs if name not in merged]
    return MergePlan(base, list(models), merged, copied, backbone_only, base.is_hf and backbone_only, notes)


def _visit(
    plan: MergePlan,
    names: Sequence[str],
    visit: Callable[[str, torch.Tensor, list[torch.Tensor] | None], None],
) -> None:
    """Call ``visit(name, theta_pre, [theta_1, ..., theta_N])`` for ``names`` in order, the models'
    list None for copied tensors. Inputs are read in runs of about ``CHUNK_BYTES`` each, and a run's
    file pages are released before the next is read: ``visit`` must copy whatever it keeps."""
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
            visit(name, base[name], [model[name] for model in models] if name in merged else None)
        del base, models  # before the next run is read


def _slices(theta_pre: torch.Tensor, thetas: list[torch.Tensor]) -> Iterator[tuple[slice, torch.Tensor]]:
    """(positions, task vectors [N, length]) along the flattened tensor, ``SLICE_ELEMENTS`` at a time,
    so that the element-wise maths works on a few MiB whatever the tensor's size."""
    flat_pre, flats = theta_pre.reshape(-1), [theta.reshape(-1) for theta in thetas]
    for start in range(0, flat_pre.numel(), SLICE_ELEMENTS):
        part = slice(start, start + SLICE_ELEMENTS)
        yield part, task_vectors(flat_pre[part], [flat[part] for flat in flats])


# --- Statistics pass and merge pass.


def _layer_of(name: str) -> int | None:
    match = re.match(r"encoder\.layers\.(\d+)\.", name)
    return int(match[1]) if match else None


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
    """Read every input once: refuse non-finite values (listed), and accumulate the Gram matrices
    of the task vectors over the whole model and per transformer layer (norms, cosine similarity).
    With ``trim_density`` (TIES) a second pass fixes each task vector's trim threshold so that the
    top ``round(trim_density * n)`` of its n magnitudes are kept."""
    scopes = ["model"] + [f"layer {i}" for i in range(plan.base.cfg.encoder_layers)]
    gram = torch.zeros(len(scopes), len(plan.models), len(plan.models), dtype=torch.float64)
    selection = None
    if trim_density is not None:
        _check_density(trim_density)
        total = sum(plan.base.specs[name][0].numel() for name in plan.merged)
        selection = MagnitudeThresholds([round(trim_density * total)] * len(plan.models))
    paths, non_finite = [plan.base.path] + [model.path for model in plan.models], []

    def accumulate(name: str, theta_pre: torch.Tensor, thetas: list[torch.Tensor] | None) -> None:
        for path, tensor in zip(paths, [theta_pre, *(thetas or [])]):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                non_finite.append(f"{path}: {name}")
        if thetas is None:
            return
        layer = _layer_of(name)
        for _, taus in _slices(theta_pre, thetas):
            product = (taus @ taus.T).double()
            gram[0] += product
            if layer is not None:
                gram[1 + layer] += product
            if selection is not None:
                selection.add(taus)

    _visit(plan, plan.merged + plan.copied, accumulate)
    if non_finite:
        shown = non_finite[:20] + ([f"and {len(non_finite) - 20} more"] if len(non_finite) > 20 else [])
        raise CheckpointError("non-finite values (NaN or inf), not merged:\n  " + "\n  ".join(shown))
    thresholds = None
    if selection is not None:
        selection.end_first_pass()

        def count(name: str, theta_pre: torch.Tensor, thetas: list[torch.Tensor]) -> None:
            for _, taus in _slices(theta_pre, thetas):
                selection.add(taus)

        _visit(plan, plan.merged, count)
        thresholds = selection.thresholds()
    return TaskVectorStats(plan.labels, scopes, gram, thresholds)


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")


def _generator(seed: int, name: str) -> torch.Generator:
    """DARE's random drops for one tensor: fixed by the seed and the tensor's name, so that every
    lambda of a sweep drops the same entries whatever the reading order."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


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
    method: str = "task_arithmetic",
    density: float = 0.2,
    seed: int = 0,
    thresholds: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The merged fairseq state dict: theta_pre + update(tau_1, ..., tau_N) for each merged tensor,
    in the base's dtype, with the update of ``method`` and one lambda per model (thesis eq. 3.7):
    ``task_arithmetic``, ``ties`` (``thresholds`` from ``analyse(plan, density)``) or ``dare``
    (``density``, ``seed``). Copied tensors are the base's; fresh heads are drawn from ``seed``.
    Memory: the merged state, plus about ``CHUNK_BYTES`` of each input at a time."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if len(lambdas) != len(plan.models):
        raise ValueError(f"{len(lambdas)} lambdas for {len(plan.models)} models")
    if method == "ties" and thresholds is None:
        raise ValueError("TIES needs the trim thresholds of analyse(plan, density)")
    if method == "dare":
        _check_density(density)
    heads = {}
    if plan.fresh_heads:
        # fresh_heads builds a model to take its heads; their shapes do not depend on the
        # transformer's depth, and a model without layers is a tenth of the size.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads = fresh_heads(dataclasses.replace(plan.base.cfg, encoder_layers=0))
    state = _empty_state(plan.base.specs)

    def combine(name: str, theta_pre: torch.Tensor, thetas: list[torch.Tensor] | None) -> None:
        if thetas is None:
            state[name].copy_(theta_pre)
            return
        merged, generator = state[name].view(-1), _generator(seed, name) if method == "dare" else None
        for part, taus in _slices(theta_pre, thetas):
            if method == "ties":
                update = ties(taus, lambdas, thresholds)
            elif method == "dare":
                update = dare(taus, lambdas, density, generator)
            else:
                update = task_arithmetic(taus, lambdas)
            merged[part] = theta_pre.reshape(-1)[part].to(update.dtype) + update

    _visit(plan, list(plan.base.specs), combine)
    return {**state, **heads}


# --- Outputs.


def write_merged(
    folder: str | os.PathLike, cfg: MertConfig, state: dict[str, torch.Tensor], record: dict
) -> None:
    """``folder/checkpoint.pt`` (fairseq; ``load_model`` and ``finetune_from_model`` read it),
    ``folder/hf/`` (stock transformers) and ``folder/merge.json`` (``record``: how it was made)."""
    folder = Path(folder)
    save_fairseq(folder / "checkpoint.pt", cfg, state)
    save_hf(folder / "hf", cfg, state)
    (folder / "merge.json").write_text(json.dumps(record, indent=2) + "\n")


def write_similarity(stats: TaskVectorStats, folder: str | os.PathLike) -> tuple[Path, Path]:
    """Pairwise cosine similarity of the task vectors (thesis Fig. 4.5), whole model and per layer:
    ``task_vector_similarity.csv`` (scope, model_a, model_b, cosine, norm_a, norm_b) and a heatmap
    ``task_vector_similarity.png``. Needs at least two models."""
    import matplotlib  # here, not at the top: merging alone does not need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, count = stats.labels, len(stats.labels)
    if count < 2:
        raise ValueError("similarity needs at least two models")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cosine, norms = stats.cosine(), stats.gram.diagonal(dim1=-2, dim2=-1).sqrt()
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    csv_path = folder / "task_vector_similarity.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["scope", "model_a", "model_b", "cosine", "norm_a", "norm_b"])
        for s, scope in enumerate(stats.scopes):
            for i, j in pairs:
                values = (cosine[s, i, j].item(), norms[s, i].item(), norms[s, j].item())
                writer.writerow([scope, labels[i], labels[j], *(f"{v:.6g}" for v in values)])

    per_layer = cosine[1:, [i for i, _ in pairs], [j for _, j in pairs]].T.numpy()  # [pairs, layers]
    # One diverging scale for both panels, set by the off-diagonal values (the diagonal is 1).
    limit = (
        max(abs(per_layer).max(), cosine[0][~torch.eye(count, dtype=torch.bool)].abs().max().item()) or 1.0
    )
    style = {"cmap": "coolwarm", "vmin": -limit, "vmax": limit}
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(12, 2 + 0.5 * max(count, len(pairs))), width_ratios=[1, 1.6]
    )
    left.imshow(cosine[0].numpy(), **style)
    for i in range(count):
        for j in range(count):
            left.text(j, i, f"{cosine[0, i, j]:.2f}", ha="center", va="center", fontsize=8)
    left.set_xticks(range(count), labels, rotation=45, ha="right")
    left.set_yticks(range(count), labels)
    left.set_title("whole model")
    image = right.imshow(per_layer, aspect="auto", **style)
    right.set_xticks(range(per_layer.shape[1]))
    right.set_xlabel("transformer layer")
    right.set_yticks(range(len(pairs)), [f"{labels[i]} / {labels[j]}" for i, j in pairs])
    right.set_title("per layer")
    figure.colorbar(image, ax=right, fraction=0.046, label="cosine similarity")
    figure.suptitle("Cosine similarity of task vectors")
    figure.tight_layout()
    png_path = folder / "task_vector_similarity.png"
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return csv_path, png_path


def merge_record(plan: MergePlan, lambdas: Sequence[float], method: str, density: float, seed: int) -> dict:
    """What ``merge.json`` records: inputs, method and its settings, and where the heads came from."""
    record = {
        "method": method,
        "base": str(plan.base.path),
        "models": [str(model.path) for model in plan.models],
        "lambdas": list(lambdas),
        "heads": "fresh" if plan.fresh_heads else "base" if plan.backbone_only else "merged",
    }
    if method != "task_arithmetic":
        record["density"] = density
    if method == "dare" or plan.fresh_heads:
        record["seed"] = seed
    return record
