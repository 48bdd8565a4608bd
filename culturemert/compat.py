"""Every workaround CultureMERT needs for fairseq, torch and encodec on current Python.

Each entry states its one-line reason. Nothing happens on import: `apply` makes every change,
and the package calls it once when it registers its plugin with fairseq (``culturemert/__init__.py``).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import types

import torch


def allow_fairseq_checkpoint_types() -> None:
    """torch >= 2.6 unpickles with ``weights_only=True`` by default, and fairseq relies on the
    old default when it resumes (``checkpoint_utils.load_checkpoint_to_cpu``) and when it
    broadcasts a loaded checkpoint to the other ranks (``broadcast_object``): allow its types."""
    from fairseq.distributed.utils import _TensorPlaceholder

    from culturemert.checkpoint import SAFE_GLOBALS

    torch.serialization.add_safe_globals([*SAFE_GLOBALS, _TensorPlaceholder])


def import_encodec() -> types.ModuleType:
    """``encodec`` imports torchaudio at module top for file I/O helpers CultureMERT never
    calls, and torchaudio does not load beside current torch: import it without torchaudio."""
    try:
        return importlib.import_module("encodec")
    except (ImportError, OSError):
        pass
    for name in [n for n in sys.modules if n == "encodec" or n.startswith("encodec.")]:
        del sys.modules[name]
    previous = sys.modules.get("torchaudio")
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        return importlib.import_module("encodec")
    finally:
        if previous is None:
            del sys.modules["torchaudio"]
        else:
            sys.modules["torchaudio"] = previous


def make_checkpoint_copies_atomic() -> None:
    """fairseq writes a checkpoint atomically, then copies it in place to checkpoint_last.pt
    (and the other names due); a kill during that copy leaves a truncated checkpoint_last.pt that
    stops the next resume: copy local files through a temporary file and a rename instead."""
    from fairseq.file_io import PathManager

    copy_in_place = PathManager.copy

    def copy_atomically(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if "://" in str(dst_path):
            return copy_in_place(src_path, dst_path, overwrite)
        temporary = f"{dst_path}.tmp"
        shutil.copyfile(src_path, temporary)
        os.replace(temporary, dst_path)
        return True

    PathManager.copy = staticmethod(copy_atomically)


_applied = False


def apply() -> None:
    """Make every change above, once per process."""
    global _applied
    if _applied:
        return
    _applied = True
    # fairseq's text_to_speech task logs an install hint for tensorboardX (an optional logger
    # CultureMERT does not use) while fairseq is imported: silence that one logger beforehand.
    logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)
    allow_fairseq_checkpoint_types()
    make_checkpoint_copies_atomic()
    # fairseq's wav2vec2_classification module runs logging.basicConfig(level=DEBUG) on import
    # (in the call above), which would flood fairseq-hydra-train's output: back to INFO.
    if logging.getLogger().level == logging.DEBUG:
        logging.getLogger().setLevel(logging.INFO)
