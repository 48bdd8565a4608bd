"""Writing MERT checkpoints: a fairseq ``.pt`` and an HF folder, atomically (thesis 3.2).

Read back by ``culturemert.checkpoint``; a full disk is a `DiskFullError` and leaves the previous
file or folder (``files.write_atomically``, ``files.replace_folder``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from culturemert.files import replace_folder, write_atomically
from culturemert.hf_format import SAFETENSORS_DTYPES, hf_config_from_mert, to_hf_state_dict
from culturemert.models.config import MertConfig


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
    write_atomically(path, lambda handle: _torch_save(checkpoint, handle))


def _torch_save(value: object, handle: BinaryIO) -> None:
    """``torch.save`` into ``handle``, re-raising a failed write's ``OSError`` (a full disk),
    which torch would report as a bare RuntimeError."""
    failures = []

    class Recording:
        def write(self, data: bytes) -> int:
            try:
                return handle.write(data)
            except OSError as error:
                failures.append(error)
                raise

        def flush(self) -> None:
            handle.flush()

    try:
        torch.save(value, Recording())
    except RuntimeError:
        if failures:
            raise failures[0] from None
        raise


def save_hf(folder: str | os.PathLike, cfg: MertConfig, state: dict[str, torch.Tensor]) -> None:
    """Write an HF folder (``config.json`` + ``model.safetensors``) of the backbone, built beside
    ``folder`` and swapped in whole (``files.replace_folder``)."""
    tensors = to_hf_state_dict(state)
    config = (json.dumps(hf_config_from_mert(cfg), indent=2) + "\n").encode()

    def build(partial: Path) -> None:
        write_atomically(partial / "model.safetensors", lambda handle: _write_safetensors(handle, tensors))
        write_atomically(partial / "config.json", lambda handle: handle.write(config))

    replace_folder(folder, build, owned=["config.json", "model.safetensors"])


def _write_safetensors(handle: BinaryIO, tensors: dict[str, torch.Tensor]) -> None:
    """The safetensors layout (header length as 8 bytes little-endian, a JSON header of dtypes,
    shapes and byte offsets padded to 8 bytes, then the raw data), written tensor by tensor so
    that no second copy of the state is made."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    handle.write(struct.pack("<Q", len(encoded)) + encoded)
    for tensor in tensors.values():
        handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
