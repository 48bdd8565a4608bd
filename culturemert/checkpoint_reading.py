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
import io
import json
import os
import pickle
import re
import typing
import warnings
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
from culturemert.models.config import MertConfig, ModelConfigError

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
    the tensors stay in the file until touched (files in torch's zip format; older ones load).
    A file torch.save did not write (text, JSON, a plain pickle) is refused, saying what it is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and (what := _not_torch_save(path)):
        raise CheckpointError(f"{path}: {what}")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the reason below says it
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
            if trust:
                checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap and is_zip)
            else:
                with torch.serialization.safe_globals(SAFE_GLOBALS):
                    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as error:
        if names := _refused_globals(path, is_zip, error):
            raise CheckpointError(
                f"{path}: refused to unpickle {', '.join(names)}, which a fairseq checkpoint does not "
                "need and which could run arbitrary code. If you trust where this file comes from, "
                "pass trust_checkpoint=True (scripts: --trust-checkpoint)."
            ) from None
        raise CheckpointError(
            f"{path}: a {'' if is_zip else 'legacy non-zip '}PyTorch checkpoint the safe loader cannot "
            f"read ({_reason(error)}); re-save it with torch.save, or pass --trust-checkpoint if you "
            "trust where it comes from"
        ) from None
    except Exception as error:  # torch reports damaged files as several exception types
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or damaged ({_reason(error)})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


SNIFFED_BYTES = 1 << 20  # what `_not_torch_save` reads of a file that is not a zip archive
NOT_TORCH_SAVE = (
    "not a PyTorch checkpoint (torch.save writes a zip archive); re-save the weights with torch.save"
)


class _NoGlobals(pickle.Unpickler):
    """Unpickles plain data only: the first class or function a pickle names stops it, unused."""

    def find_class(self, module: str, name: str) -> typing.NoReturn:
        raise _NamedGlobal(f"{module}.{name}")


class _NamedGlobal(Exception):
    """The class or function a pickle refers to (``module.name``), met by `_NoGlobals`."""


def _not_torch_save(path: Path) -> str | None:
    """Why a file that is not a zip archive is not a legacy ``torch.save`` file either (which
    begins with torch's magic number, pickled); None if it is one. Reads the file's start and
    unpickles at most its first pickle, plain data only: nothing in the file runs."""
    with path.open("rb") as file:
        head = file.read(SNIFFED_BYTES)
    if not head:
        return "an empty file, not a PyTorch checkpoint"
    if head.startswith(b"PK\x03\x04"):
        return "not a readable PyTorch checkpoint, truncated or damaged (a zip archive without its end)"
    try:
        first = _NoGlobals(io.BytesIO(head)).load()
    except _NamedGlobal as named:
        return f"a plain pickle of {named}, {NOT_TORCH_SAVE}"
    except Exception:  # not a pickle, or one longer than the part read
        if head.startswith(b"\x80"):
            return f"a pickle, {NOT_TORCH_SAVE}"
        return f"not a PyTorch checkpoint ({_describe_start(head)})"
    if type(first) is int and first == torch.serialization.MAGIC_NUMBER:
        return None
    return f"a plain pickle of a {type(first).__name__}, {NOT_TORCH_SAVE}"


def _describe_start(head: bytes) -> str:
    """What the start of a file that is neither a zip archive nor a pickle looks like."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:  # text cut inside a character at the end still counts
        text = head[: error.start].decode("utf-8") if error.start > len(head) - 4 else ""
    if not text or any(not c.isprintable() and c not in "\t\n\r\f" for c in text):
        return f"neither a zip archive nor a pickle; it starts with bytes {head[:8].hex(' ')}"
    if text.lstrip()[:1] in ("{", "["):
        return "it starts with JSON text"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"it starts with text: {first[:40] + ('...' if len(first) > 40 else '')!r}"


def _refused_globals(path: Path, is_zip: bool, error: BaseException) -> list[str]:
    """The classes and functions outside ``SAFE_GLOBALS`` that a checkpoint refers to: torch's
    listing for a zip archive, else the one its refusal names."""
    unsafe = re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))
    if is_zip:
        try:
            unsafe += torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # a damaged archive: the loader's own reason is named instead
            pass
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS}
    return sorted(set(unsafe) - allowed)


def _reason(error: BaseException) -> str:
    """The informative line of a library's error message, without torch's prefix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = next((line for line in lines if "Unsupported" in line), lines[0])
    line = line.removeprefix("WeightsUnpickler error:").strip()
    return line if len(line) <= 200 else line[:200] + "..."


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
        return MertConfig.from_dict(dict(cfg["model"]), str(path)), checkpoint["model"], specs
    except CheckpointError:
        raise
    except ModelConfigError as error:
        raise CheckpointError(str(error)) from None
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


def open_hf(folder: str | os.PathLike, trust: bool = False) -> tuple[MertConfig, StoredTensors]:
    """Config and stored backbone tensors (fairseq names) of an HF folder: ``config.json`` and
    ``model.safetensors`` or, in older uploads, ``pytorch_model.bin`` (``trust``: unpickled
    without the allow-list); no tensor data read. Sharded weights are refused, saying how to
    save them in one file."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: missing config.json; expected an HF model folder")
    weights = next((folder / name for name in HF_WEIGHT_FILES if (folder / name).is_file()), None)
    indexes = [f"{name}.index.json" for name in HF_WEIGHT_FILES if (folder / f"{name}.index.json").is_file()]
    if weights is None and indexes:
        raise CheckpointError(
            f"{folder}: its weights are sharded ({indexes[0]}), which is not supported; save the model "
            'in one file with transformers: model.save_pretrained(folder, max_shard_size="10GB")'
        )
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
        file_specs = _tensor_specs(weights, read_checkpoint(weights, trust, mmap=True))
    names = {key: hf_key_to_fairseq(key) for key in file_specs}
    if unknown := [key for key, name in names.items() if name is None]:
        raise CheckpointError(f"{weights}: keys that are not part of a MERT backbone: {listing(unknown)}")
    keys = {name: key for key, name in names.items()}

    def load(wanted: list[str]) -> dict[str, torch.Tensor]:
        if weights.suffix != ".safetensors":
            tensors = read_checkpoint(weights, trust, mmap=True)
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
