"""Merge inputs: fairseq ``.pt`` files and HF folders, opened lazily through ``culturemert.checkpoint``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from culturemert.checkpoint import CheckpointError, Specs, StoredTensors, open_fairseq, open_hf
from culturemert.models.config import MertConfig


@dataclass
class Source:
    """A merge input: its configuration and stored tensors (fairseq names). HF folders carry the
    backbone only (no pre-training heads)."""

    path: Path
    cfg: MertConfig
    stored: StoredTensors
    is_hf: bool

    @property
    def specs(self) -> Specs:
        """Name -> (shape, dtype) of every stored tensor."""
        return self.stored.specs

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, backed by a mapping of the file where the format allows (pages read
        on first touch); the memory they take is released when the last of them is dropped."""
        return self.stored.read(names)


def open_source(path: str | os.PathLike, trust: bool = False) -> Source:
    """Open a fairseq ``.pt`` (``trust``: unpickle without the allow-list) or an HF folder, reading
    its configuration and tensor names, shapes and dtypes but no tensor data."""
    path = Path(path)
    if path.is_dir():
        return Source(path, *open_hf(path, trust), is_hf=True)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or HF folder")
    return Source(path, *open_fairseq(path, trust), is_hf=False)


def labels(sources: Sequence[Source]) -> list[str]:
    """Short names for reports: file stems or folder names, full paths when those collide."""
    names = [source.path.name if source.is_hf else source.path.stem for source in sources]
    return names if len(set(names)) == len(names) else [str(source.path) for source in sources]
