"""Reading and writing MERT checkpoints: fairseq ``.pt`` files and HF folders (thesis 3.2).

The one reader of both formats: ``open_fairseq`` / ``open_hf`` (``checkpoint_reading``) give the
configuration and the stored tensors' names, shapes and dtypes without reading tensor data;
``check_state`` compares them with the model the configuration describes, on the meta device,
before anything is allocated; ``read_fairseq`` / ``read_hf`` / ``load_model`` do both and refuse
non-finite weights; ``convert`` turns one format into the other. The readers of
``checkpoint_reading`` and the writers of ``checkpoint_writing`` (``save_fairseq``, ``save_hf``)
are importable from here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from culturemert.checkpoint_reading import (
    HF_WEIGHT_FILES,
    SAFE_GLOBALS,
    CheckpointError,
    Specs,
    StoredTensors,
    fairseq_parts,
    open_fairseq,
    open_hf,
    read_checkpoint,
)
from culturemert.checkpoint_writing import save_fairseq, save_hf
from culturemert.errors import listing
from culturemert.files import writing
from culturemert.hf_format import HEAD_PREFIXES
from culturemert.models.config import ModelConfigError
from culturemert.models.mert import MertConfig, MertModel

__all__ = [
    "DERIVED_PREFIXES",
    "HF_WEIGHT_FILES",
    "SAFE_GLOBALS",
    "CheckpointError",
    "Specs",
    "StoredTensors",
    "build_and_load",
    "check_state",
    "convert",
    "fresh_heads",
    "load_model",
    "non_finite",
    "open_fairseq",
    "open_hf",
    "read_checkpoint",
    "read_fairseq",
    "read_hf",
    "refuse_non_finite",
    "save_fairseq",
    "save_hf",
]

logger = logging.getLogger(__name__)

# Tensors a released checkpoint may carry that are recomputed rather than learned: the CQT
# kernels of the nnAudio layer the release kept inside its model.
DERIVED_PREFIXES = ("encoder_cqt_model.spec_layer.",)


def _layer_count(specs: Specs, prefix: str) -> int:
    return len({name[len(prefix) :].split(".")[0] for name in specs if name.startswith(prefix)})


def check_state(source: str | os.PathLike, cfg: MertConfig, specs: Specs, heads: bool = True) -> None:
    """Refuse stored tensors ``specs`` that do not fit a MERT model of ``cfg``, before anything is
    allocated: the numbers of conv and transformer layers first (a stored config asking for 10^8
    layers is refused at once), then every name and shape against the model built on the meta
    device. ``heads``: the pre-training heads must be stored too (HF weights have none)."""
    specs = {name: spec for name, spec in specs.items() if not name.startswith(DERIVED_PREFIXES)}
    try:
        cfg.check(str(source))
    except ModelConfigError as error:
        raise CheckpointError(str(error)) from None
    try:
        counts = [
            ("conv layers", len(cfg.conv_layers), _layer_count(specs, "feature_extractor.conv_layers.")),
            ("transformer layers", cfg.encoder_layers, _layer_count(specs, "encoder.layers.")),
        ]
        for what, configured, stored in counts:
            if configured != stored:
                raise CheckpointError(
                    f"{source}: its configuration asks for {configured!r} {what}, its weights hold {stored}"
                )
        with torch.device("meta"):
            expected = MertModel(cfg).state_dict()
    except CheckpointError:
        raise
    except Exception as error:  # whatever a nonsensical configuration makes the constructors raise
        raise CheckpointError(
            f"{source}: its configuration does not describe a MERT model ({error})"
        ) from None
    if not heads:
        expected = {name: t for name, t in expected.items() if not name.startswith(HEAD_PREFIXES)}
    shared = sorted(set(specs) & set(expected))
    problems = [
        f"{kind}: {listing(names)}"
        for kind, names in (
            ("missing keys", sorted(set(expected) - set(specs))),
            ("unexpected keys", sorted(set(specs) - set(expected))),
            (
                "shape mismatches",
                [
                    f"{k}: checkpoint {tuple(specs[k][0])} vs model {tuple(expected[k].shape)}"
                    for k in shared
                    if specs[k][0] != expected[k].shape
                ],
            ),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not fit a MERT model of its configuration: " + "; ".join(problems)
        )


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def refuse_non_finite(found: Sequence[str]) -> None:
    """The one refusal of non-finite weights (CPT, merging, probing); ``found``: "file: tensor"."""
    if found:
        raise CheckpointError(
            f"non-finite weights (NaN or inf), refused: {listing(found)}; the model diverged or the "
            "file is damaged"
        )


def build_and_load(source: str, cfg: MertConfig, state: dict[str, torch.Tensor]) -> MertModel:
    """A MertModel of ``cfg`` holding exactly ``state`` (refused with a list of problems, checked
    on the meta device before the model is allocated)."""
    state = {k: v for k, v in state.items() if not k.startswith(DERIVED_PREFIXES)}
    check_state(source, cfg, {name: (t.shape, t.dtype) for name, t in state.items()})
    model = MertModel(cfg)
    model.load_state_dict(state)
    return model


def read_fairseq(path: str | os.PathLike, trust: bool = False, mmap: bool = False) -> tuple[MertConfig, dict]:
    """Model config and state dict of a fairseq ``.pt`` (ours or the released MERT-v1-95M),
    checked against the model (``check_state``) and for non-finite weights."""
    path = Path(path)
    cfg, state, specs = fairseq_parts(path, read_checkpoint(path, trust, mmap))
    check_state(path, cfg, specs)
    refuse_non_finite([f"{path}: {name}" for name in non_finite(state)])
    return cfg, state


def read_hf(folder: str | os.PathLike, trust: bool = False) -> tuple[MertConfig, dict]:
    """Model config and fairseq-named backbone state of an HF folder (heads absent), checked
    against the model and for non-finite weights (``trust``: unpickle a ``pytorch_model.bin``
    without the allow-list)."""
    cfg, stored = open_hf(folder, trust)
    check_state(folder, cfg, stored.specs, heads=False)
    state = stored.read(stored.specs)
    refuse_non_finite([f"{folder}: {name}" for name in non_finite(state)])
    return cfg, state


def fresh_heads(cfg: MertConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Newly initialised pre-training heads, for backbones that come without them (HF), drawn
    from ``seed`` (the global random state is left as it was). Their shapes do not depend on the
    transformer's depth, so they are taken from a model without layers, a tenth of the size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MertModel(dataclasses.replace(cfg, encoder_layers=0))
    return {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", trust_checkpoint: bool = False
) -> MertModel:
    """A MertModel in eval mode from a fairseq ``.pt`` or an HF folder (``trust_checkpoint``:
    unpickle a ``.pt`` without the allow-list, for files from a source the user trusts).

    HF folders carry no pre-training heads: they are freshly initialised (logged).
    """
    path = Path(path)
    if path.is_dir():
        cfg, state = read_hf(path, trust_checkpoint)
        heads = fresh_heads(cfg)
        logger.info("%s has no pre-training heads; initialised %s", path, ", ".join(heads))
        state.update(heads)
    elif path.exists():
        cfg, state = read_fairseq(path, trust_checkpoint)
    else:
        raise CheckpointError(
            f"{path}: not found. Pass a fairseq .pt (e.g. MERT-v1-95M_fairseq.pt) or a Hugging "
            "Face folder with config.json and model.safetensors (see README, 'Weights')."
        )
    return build_and_load(str(path), cfg, state).to(device).eval()


def convert(src: str | os.PathLike, dst: str | os.PathLike, trust_checkpoint: bool = False) -> str:
    """fairseq ``.pt`` -> HF folder, or HF folder -> fairseq ``.pt``; returns a summary line.

    The state is validated against the model first, so a bad source writes nothing; a `dst` of the
    wrong form for the direction (``out/`` for a file, ``x.pt`` for a folder) is refused, and so
    is a second conversion writing the same `dst` (``files.writing``).
    """
    named, src, dst = str(dst), Path(src), Path(dst)
    to_file = src.is_dir()
    if to_file and named.endswith(("/", os.sep)):
        raise CheckpointError(
            f"{named}: an HF folder converts to a .pt file; give a file name such as mert.pt"
        )
    if not to_file and dst.suffix == ".pt":
        raise CheckpointError(f"{named}: a .pt converts to an HF folder; give a folder name such as mert_hf/")
    with writing(dst):
        if to_file:
            cfg, state = read_hf(src, trust_checkpoint)
            heads = fresh_heads(cfg)
            build_and_load(str(src), cfg, {**state, **heads})
            save_fairseq(dst, cfg, {**state, **heads})
            return (
                f"wrote {dst}: backbone from {src}; the HF folder has no pre-training heads, so "
                f"{', '.join(sorted(heads))} are freshly initialised"
            )
        cfg, state = read_fairseq(src, trust_checkpoint)
        model = build_and_load(str(src), cfg, state)
        save_hf(dst, cfg, model.state_dict())
    dropped = sorted(k for k in model.state_dict() if k.startswith(HEAD_PREFIXES))
    return f"wrote {dst}: backbone of {src}; pre-training heads not exported: {', '.join(dropped)}"
