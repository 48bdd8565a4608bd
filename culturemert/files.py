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

