"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from culturemert.errors import UserError


class DiskFullError(UserError):
    """The disk filled up while writing; nothing incomplete was left under the final name."""


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary sibling that replaces it only once fully on disk.

    If the write fails (a full disk, a kill), ``path`` keeps its previous content or stays
    absent; a full disk is a `DiskFullError` naming the file, and the temporary is removed.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path}: the disk is full ({error.strerror}); free space, rerun") from None
        raise


def write_json_atomically(path: str | os.PathLike, value: dict) -> None:
    write_atomically(path, lambda handle: handle.write(json.dumps(value, indent=1).encode()))


def part_path(partial: Path, index: int) -> Path:
    """The file of part ``index`` of resumable work kept in the folder ``partial``."""
    return partial / f"part-{index:06d}.npz"


def start_or_resume(partial: Path, settings: dict, error: type[Exception]) -> None:
    """Create ``partial`` (the folder of resumable work) with a record of its ``settings``, or
    check that existing partial work was made with the same ones, raising ``error`` otherwise."""
    record = partial / "settings.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous != settings:
            changed = sorted(key for key in settings if previous.get(key) != settings[key])
            raise error(
                f"{partial} holds partial work made with other {', '.join(changed)}; rerun with the "
                f"same options to resume, or delete {partial} to start over"
            )
        return
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomically(record, settings)
