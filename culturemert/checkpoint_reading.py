"""Opening MERT checkpoint files: fairseq ``.pt`` files and HF folders (thesis 3.2).

``open_fairseq`` / ``open_hf`` give the configuration and the stored tensors' names (fairseq's),
shapes and dtypes without reading tensor data. ``.pt`` files are unpickled with PyTorch's
``weights_only`` loader and an explicit allow-list of the types fairseq checkpoints contain
(``SAFE_GLOBALS``), so opening a checkpoint never runs code from it. Every malformed file is a
`CheckpointError` naming the file and the problem. Checking the tensors against the model and
loading it: ``culturemert.checkpoint``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import typing
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import omegaconf
import torch
from fairseq.data.dictionary import Dictionary
from fairseq.logging import meters
from safetensors import SafetensorError, safe_open

from culturemert.errors import UserError, listing
from culturemert.hf_format import SAFETENSORS_DTYPES, hf_key_to_fairseq, mert_config_from_hf
from culturemert.models.config import MertConfig

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


def fairseq_parts(path: Path, checkpoint: dict) -> tuple[MertConfig, dict, Specs]:
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
    cfg, _, specs = fairseq_parts(path, read_checkpoint(path, trust, mmap=True))

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
