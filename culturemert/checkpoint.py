"""Reading and writing MERT checkpoints: fairseq ``.pt`` files and HF folders (SPEC §1).

``.pt`` files are unpickled with PyTorch's ``weights_only`` loader and an explicit allow-list
of the types fairseq checkpoints contain, so opening a checkpoint never runs code from it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import pickle
import typing
import zipfile
from pathlib import Path

import numpy as np
import omegaconf
import torch
from fairseq.data.dictionary import Dictionary
from fairseq.logging import meters
from safetensors.torch import load_file, save_file

from culturemert.errors import UserError
from culturemert.hf_format import (
    HEAD_PREFIXES,
    hf_config_from_mert,
    hf_key_to_fairseq,
    mert_config_from_hf,
    to_hf_state_dict,
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


def read_checkpoint(path: str | os.PathLike, trust: bool = False, mmap: bool = False) -> dict:
    """Unpickle a ``.pt`` file. Unless ``trust``, only tensors, plain containers and
    ``SAFE_GLOBALS`` are allowed; anything else is refused before any of it runs. With ``mmap``
    the tensors stay in the file until touched (files in torch's zip format; older ones load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    mmap = mmap and zipfile.is_zipfile(path)
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS}
        names = ", ".join(sorted(set(unsafe) - allowed)) or str(error).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to unpickle {names}, which a fairseq checkpoint does not need "
            "and which could run arbitrary code. If you trust where this file comes from, "
            "pass trust_checkpoint=True (scripts: --trust-checkpoint)."
        ) from None
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error})") from None


def _check_keys(source: str, model: MertModel, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise CheckpointError(f"{source} does not fit a MERT model:\n  " + "\n  ".join(problems))


def build_and_load(source: str, cfg: MertConfig, state: dict[str, torch.Tensor]) -> MertModel:
    """A MertModel of ``cfg`` holding exactly ``state`` (refused with a list of problems)."""
    state = {k: v for k, v in state.items() if not k.startswith(DERIVED_PREFIXES)}
    model = MertModel(cfg)
    _check_keys(source, model, state)
    model.load_state_dict(state)
    return model


def read_fairseq(
    path: str | os.PathLike, trust: bool = False, mmap: bool = False
) -> tuple[MertConfig, dict]:
    """Model config and state dict of a fairseq ``.pt`` (ours or the released MERT-v1-95M)."""
    checkpoint = read_checkpoint(path, trust, mmap)
    if "model" not in checkpoint:
        raise CheckpointError(f"{path}: no 'model' entry; is this a fairseq checkpoint?")
    cfg = checkpoint.get("cfg") or {}
    if not cfg and checkpoint.get("args") is not None:
        cfg = {"model": vars(checkpoint["args"])}
    if "model" not in cfg:
        raise CheckpointError(f"{path}: no model configuration ('cfg' or 'args') inside")
    return MertConfig.from_dict(dict(cfg["model"])), checkpoint["model"]


def read_hf(folder: str | os.PathLike) -> tuple[MertConfig, dict]:
    """Model config and fairseq-named backbone state of an HF folder (heads absent).

    Weights come from ``model.safetensors`` or, in older uploads, ``pytorch_model.bin``.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: missing config.json; expected an HF model folder")
    weights_path = next(
        (folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()),
        None,
    )
    if weights_path is None:
        raise CheckpointError(f"{folder}: missing model.safetensors (or pytorch_model.bin)")
    cfg = mert_config_from_hf(json.loads(config_path.read_text()), str(folder))
    tensors = (
        load_file(weights_path) if weights_path.suffix == ".safetensors" else read_checkpoint(weights_path)
    )
    state, unknown = {}, []
    for key, value in tensors.items():
        name = hf_key_to_fairseq(key)
        if name is None:
            unknown.append(key)
        else:
            state[name] = value
    if unknown:
        raise CheckpointError(
            f"{weights_path}: keys that are not part of a MERT backbone: " + ", ".join(unknown)
        )
    return cfg, state


def fresh_heads(cfg: MertConfig) -> dict[str, torch.Tensor]:
    """Newly initialised pre-training heads, for backbones that come without them (HF)."""
    return {k: v for k, v in MertModel(cfg).state_dict().items() if k.startswith(HEAD_PREFIXES)}


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", trust_checkpoint: bool = False
) -> MertModel:
    """A MertModel in eval mode from a fairseq ``.pt`` or an HF folder.

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


def save_fairseq(path: str | os.PathLike, cfg: MertConfig, state: dict[str, torch.Tensor]) -> None:
    """Write a fairseq-format ``.pt`` that ``load_model`` reads and that fairseq-hydra-train
    accepts as ``checkpoint.finetune_from_model`` (fresh optimizer and schedule). Atomic."""
    path = Path(path)
    checkpoint = {
        "args": None,
        "cfg": {"model": {**dataclasses.asdict(cfg), "_name": "mert"}},
        "model": state,
        "optimizer_history": [
            {
                "criterion_name": "mert_mlm",
                "optimizer_name": None,
                "num_updates": 0,
                "lr_scheduler_state": {"best": None},
            }
        ],
        "extra_state": {},
        "last_optimizer_state": None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)


def save_hf(folder: str | os.PathLike, cfg: MertConfig, state: dict[str, torch.Tensor]) -> None:
    """Write an HF folder (``config.json`` + ``model.safetensors``) of the backbone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in to_hf_state_dict(state).items()}
    partial = folder / "model.safetensors.partial"
    save_file(tensors, partial, metadata={"format": "pt"})
    os.replace(partial, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config_from_mert(cfg), indent=2) + "\n")


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
