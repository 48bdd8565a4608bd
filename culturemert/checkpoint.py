"""Reading and writing MERT checkpoints: fairseq ``.pt`` files and HF folders (thesis 3.2).

The one reader of both formats: ``open_fairseq`` / ``open_hf`` give the configuration and the
stored tensors' names, shapes and dtypes without reading tensor data; ``check_state`` compares
them with the model the configuration describes, on the meta device, before anything is
allocated; ``read_fairseq`` / ``read_hf`` / ``load_model`` do both and refuse non-finite weights.
``.pt`` files are unpickled with PyTorch's ``weights_only`` loader and an explicit allow-list
of the types fairseq checkpoints contain, so opening a checkpoint never runs code from it.
Every malformed file is a `CheckpointError` naming the file and the problem. The writers
(``save_fairseq``, ``save_hf``) live in ``checkpoint_writing`` and are importable from here.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pickle
import typing
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import omegaconf
import torch
from fairseq.data.dictionary import Dictionary
from fairseq.logging import meters
from safetensors import SafetensorError, safe_open

from culturemert.checkpoint_writing import save_fairseq, save_hf
from culturemert.errors import UserError, listing
from culturemert.hf_format import (
    HEAD_PREFIXES,
    SAFETENSORS_DTYPES,
    hf_key_to_fairseq,
    mert_config_from_hf,
)
from culturemert.models.mert import MertConfig, MertModel

logger = logging.getLogger(__name__)

# Types a fairseq checkpoint may pickle besides tensors and plain containers: the task's
# dictionaries, training meters, argparse configs of old releases, numpy scalars in meters, and
# omegaconf containers (fairseq broadcasts a loaded checkpoint, config included, to every rank).
SAFE_GLOBALS = [
    argparse.Namespace,
    typing.Any,
    dict,
    list,
    int,
    float,
    str,
    bool,
    omegaconf.DictConfig,
    omegaconf.ListConfig,
    omegaconf.base.ContainerMetadata,
    omegaconf.base.Metadata,
    omegaconf.nodes.AnyNode,
    omegaconf.nodes.StringNode,
    omegaconf.nodes.IntegerNode,
    omegaconf.nodes.FloatNode,
    omegaconf.nodes.BooleanNode,
    collections.defaultdict,
    Dictionary,
    meters.AverageMeter,
    meters.SumMeter,
    meters.TimeMeter,
    meters.StopwatchMeter,
    meters.MetersDict,
    np.dtype,
    np.core.multiarray.scalar,
    np.core.multiarray._reconstruct,
    np.ndarray,
    *{type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")},
]

# Tensors a released checkpoint may carry that are recomputed rather than learned: the CQT
# kernels of the nnAudio layer the release kept inside its model.
DERIVED_PREFIXES = ("encoder_cqt_model.spec_layer.",)


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


# Weight files of an HF folder, in order of preference (older uploads have only the second).
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


Specs = dict[str, tuple[torch.Size, torch.dtype]]


def read_checkpoint(path: str | os.PathLike, trust: bool = False, mmap: bool = False) -> dict:
    """Unpickle a ``.pt`` file. Unless ``trust``, only tensors, plain containers and
    ``SAFE_GLOBALS`` are allowed; anything else is refused before any of it runs. With ``mmap``
    the tensors stay in the file until touched (files in torch's zip format; older ones load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    is_zip = zipfile.is_zipfile(path)
    try:
        if trust:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap and is_zip)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as error:
        if not is_zip:
            raise CheckpointError(
                f"{path}: not a checkpoint the safe loader can read (a legacy non-zip .pt or a plain "
                f"pickle: {_reason(error)}); re-save it with torch.save, or pass --trust-checkpoint "
                "if you trust where it comes from"
            ) from None
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # a damaged archive: the loader's own reason is named below
            unsafe = []
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS}
        names = ", ".join(sorted(set(unsafe) - allowed)) or _reason(error)
        raise CheckpointError(
            f"{path}: refused to unpickle {names}, which a fairseq checkpoint does not need "
            "and which could run arbitrary code. If you trust where this file comes from, "
            "pass trust_checkpoint=True (scripts: --trust-checkpoint)."
        ) from None
    except Exception as error:  # torch reports damaged files as several exception types
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or damaged ({_reason(error)})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


def _reason(error: BaseException) -> str:
    """The informative line of a library's error message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if "Unsupported global" in line or "error:" in line), lines[0])


@dataclass
class StoredTensors:
    """A checkpoint's tensors by fairseq name: ``specs`` (shape, dtype) known without reading any
    tensor data; ``read(names)`` loads some, mapped from the file where the format allows (pages
    are read on first touch and released when the last of the tensors is dropped)."""

    path: Path
    specs: Specs
    load: Callable[[list[str]], dict[str, torch.Tensor]]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return self.load(list(names))


def _tensor_specs(path: Path, state: object) -> Specs:
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: no tensors inside; is this a MERT checkpoint?")
    if others := [str(name) for name, value in state.items() if not isinstance(value, torch.Tensor)]:
        raise CheckpointError(f"{path}: entries that are not tensors: {listing(others)}")
    return {name: (value.shape, value.dtype) for name, value in state.items()}


def _fairseq_parts(path: Path, checkpoint: dict) -> tuple[MertConfig, dict, Specs]:
    """Config, state dict and specs of an unpickled fairseq checkpoint."""
    if "model" not in checkpoint:
        raise CheckpointError(f"{path}: no 'model' entry; is this a fairseq checkpoint?")
    specs = _tensor_specs(path, checkpoint["model"])
    cfg = checkpoint.get("cfg") or {}
    try:
        if not cfg and checkpoint.get("args") is not None:
            cfg = {"model": vars(checkpoint["args"])}
        if "model" not in cfg:
            raise CheckpointError(f"{path}: no model configuration ('cfg' or 'args') inside")
        return MertConfig.from_dict(dict(cfg["model"])), checkpoint["model"], specs
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: unreadable model configuration ({error})") from None


def open_fairseq(path: str | os.PathLike, trust: bool = False) -> tuple[MertConfig, StoredTensors]:
    """Config and stored tensors of a fairseq ``.pt``, no tensor data read and nothing checked."""
    path = Path(path)
    cfg, _, specs = _fairseq_parts(path, read_checkpoint(path, trust, mmap=True))

    def load(names: list[str]) -> dict[str, torch.Tensor]:
        state = read_checkpoint(path, trust, mmap=True)["model"]
        return {name: state[name] for name in names}

    return cfg, StoredTensors(path, specs, load)


def open_hf(folder: str | os.PathLike) -> tuple[MertConfig, StoredTensors]:
    """Config and stored backbone tensors (fairseq names) of an HF folder: ``config.json`` and
    ``model.safetensors`` or, in older uploads, ``pytorch_model.bin``; no tensor data read."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: missing config.json; expected an HF model folder")
    weights = next((folder / name for name in HF_WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: missing model.safetensors (or pytorch_model.bin); no weights")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error})") from None
    try:
        cfg = mert_config_from_hf(config, str(folder))
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    if weights.suffix == ".safetensors":
        file_specs = _safetensors_specs(weights)
    else:
        file_specs = _tensor_specs(weights, read_checkpoint(weights, mmap=True))
    names = {key: hf_key_to_fairseq(key) for key in file_specs}
    if unknown := [key for key, name in names.items() if name is None]:
        raise CheckpointError(f"{weights}: keys that are not part of a MERT backbone: {listing(unknown)}")
    keys = {name: key for key, name in names.items()}

    def load(wanted: list[str]) -> dict[str, torch.Tensor]:
        if weights.suffix != ".safetensors":
            tensors = read_checkpoint(weights, mmap=True)
            return {name: tensors[keys[name]] for name in wanted}
        try:
            with safe_open(weights, framework="pt") as tensors:
                return {name: tensors.get_tensor(keys[name]) for name in wanted}
        except SafetensorError as error:
            raise CheckpointError(f"{weights}: unreadable safetensors file ({error})") from None

    return cfg, StoredTensors(weights, {names[key]: spec for key, spec in file_specs.items()}, load)


def _safetensors_specs(path: Path) -> Specs:
    try:
        with safe_open(path, framework="pt") as tensors:
            views = {key: tensors.get_slice(key) for key in tensors.keys()}
            raw = {key: (view.get_shape(), view.get_dtype()) for key, view in views.items()}
    except SafetensorError as error:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({error})") from None
    if unsupported := [
        f"{key} ({dtype})" for key, (_, dtype) in raw.items() if dtype not in SAFETENSORS_DTYPES
    ]:
        raise CheckpointError(f"{path}: tensors of unsupported dtypes: {listing(unsupported)}")
    return {key: (torch.Size(shape), SAFETENSORS_DTYPES[dtype]) for key, (shape, dtype) in raw.items()}


def _layer_count(specs: Specs, prefix: str) -> int:
    return len({name[len(prefix) :].split(".")[0] for name in specs if name.startswith(prefix)})


_SIZE_FIELDS = (
    "encoder_layers",
    "encoder_embed_dim",
    "encoder_ffn_embed_dim",
    "encoder_attention_heads",
    "conv_pos",
    "conv_pos_groups",
)


def check_state(source: str | os.PathLike, cfg: MertConfig, specs: Specs, heads: bool = True) -> None:
    """Refuse stored tensors ``specs`` that do not fit a MERT model of ``cfg``, before anything is
    allocated: the numbers of conv and transformer layers first (a stored config asking for 10^8
    layers is refused at once), then every name and shape against the model built on the meta
    device. ``heads``: the pre-training heads must be stored too (HF weights have none)."""
    specs = {name: spec for name, spec in specs.items() if not name.startswith(DERIVED_PREFIXES)}
    sizes = {name: getattr(cfg, name) for name in _SIZE_FIELDS}
    if bad := [
        f"{k}={v!r}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1
    ]:
        raise CheckpointError(
            f"{source}: its configuration has {listing(bad)}; sizes must be positive integers"
        )
    if cfg.encoder_embed_dim % cfg.encoder_attention_heads:
        raise CheckpointError(
            f"{source}: its configuration splits encoder_embed_dim={cfg.encoder_embed_dim} into "
            f"encoder_attention_heads={cfg.encoder_attention_heads}, which does not divide it"
        )
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
    cfg, state, specs = _fairseq_parts(path, read_checkpoint(path, trust, mmap))
    check_state(path, cfg, specs)
    refuse_non_finite([f"{path}: {name}" for name in non_finite(state)])
    return cfg, state


def read_hf(folder: str | os.PathLike) -> tuple[MertConfig, dict]:
    """Model config and fairseq-named backbone state of an HF folder (heads absent), checked
    against the model and for non-finite weights."""
    cfg, stored = open_hf(folder)
    check_state(folder, cfg, stored.specs, heads=False)
    state = stored.read(stored.specs)
    refuse_non_finite([f"{folder}: {name}" for name in non_finite(state)])
    return cfg, state


def fresh_heads(cfg: MertConfig) -> dict[str, torch.Tensor]:
    """Newly initialised pre-training heads, for backbones that come without them (HF)."""
    return {k: v for k, v in MertModel(cfg).state_dict().items() if k.startswith(HEAD_PREFIXES)}


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", trust_checkpoint: bool = False
) -> MertModel:
    """A MertModel in eval mode from a fairseq ``.pt`` or an HF folder (``trust_checkpoint``:
    unpickle a ``.pt`` without the allow-list, for files from a source the user trusts).

    HF folders carry no pre-training heads: they are freshly initialised (logged).
    """
    path = Path(path)
    if path.is_dir():
        cfg, state = read_hf(path)
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

    The state is validated against the model first, so a bad source writes nothing.
    """
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        cfg, state = read_hf(src)
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
