"""A merged model on disk: ``checkpoint.pt`` (fairseq), ``hf/`` (transformers), ``merge.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from culturemert.checkpoint import save_fairseq, save_hf
from culturemert.files import replace_folder, write_atomically, writing
from culturemert.models.config import MertConfig

# What a merge output folder may hold: one merge, the similarity files, a sweep's merges.
MERGE_FILES = ["checkpoint.pt", "hf", "merge.json", "task_vector_similarity.*", "lambda_*"]


def write_merge_files(
    folder: str | os.PathLike, cfg: MertConfig, state: dict[str, torch.Tensor], record: dict
) -> None:
    """``folder/checkpoint.pt`` (fairseq; ``load_model`` and ``finetune_from_model`` read it),
    ``folder/hf/`` (stock transformers) and ``folder/merge.json`` (``record``, strict JSON), each
    written atomically into a folder being built (see ``write_merged``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    save_fairseq(folder / "checkpoint.pt", cfg, state)
    save_hf(folder / "hf", cfg, state)
    write_atomically(folder / "merge.json", lambda handle: handle.write(text.encode()))


def write_merged(
    folder: str | os.PathLike, cfg: MertConfig, state: dict[str, torch.Tensor], record: dict
) -> None:
    """The files of ``write_merge_files``, built beside ``folder`` and swapped in whole: a kill or a
    full disk leaves the previous merge or the new one, never a mix (``files.replace_folder``);
    another writer of ``folder`` is refused (``files.writing``)."""
    with writing(folder):
        replace_folder(folder, lambda partial: write_merge_files(partial, cfg, state, record), MERGE_FILES)
