"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one;
and the lock that keeps a second writer of the same output out."""

from __future__ import annotations

import ctypes
import datetime
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from culturemert.errors import UserError, listing


class DiskFullError(UserError):
    """The disk filled up while writing; nothing incomplete was left under the final name."""


class InUseError(UserError):
    """An output or run folder that another process is writing."""


@contextmanager
def held(lock: Path, what: str, advice: str, remove: bool = False) -> Iterator[int]:
    """Hold the ``flock`` of the file `lock` (created if missing; the holder is written in it)
    for the block, and yield its descriptor, which child processes may inherit to keep holding
    it. A lock another process holds is an `InUseError` at once: "`what` is in use by <holder>;
    `advice`". The kernel releases it when its holders end, so a crash never leaves it held.
    `remove`: delete the file at the end, while still held (a process that opened it meanwhile
    finds it gone and opens the new one)."""
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            holder = lock.read_text().strip() if lock.exists() else ""
            raise InUseError(f"{what} is in use by {holder or 'another process'}; {advice}") from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)  # the holder before us removed it: take the new file
    try:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        yield descriptor
    finally:
        if remove:
            lock.unlink(missing_ok=True)
        os.close(descriptor)


def output_path(path: str | os.PathLike) -> Path:
    """The path an output named `path` is written at: absolute, through symbolic links (a link
    keeps pointing at the new output), so ``.`` and ``out/`` name a folder too."""
    return Path(os.path.realpath(path))


@contextmanager
def writing(output: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of one output of a command (`output_path`; a hidden ``.<name>.lock`` beside
    it) while it is made: a second command writing the same output is refused at once rather
    than racing the first to a mix of both."""
    path = output_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    with held(lock, str(path), "wait for it to finish, or choose another output", remove=True):
        yield path


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary sibling that replaces it only once fully on disk.

    If the write fails (a full disk, a kill), ``path`` keeps its previous content or stays
    absent; a full disk is a `DiskFullError` naming the file, and the temporary is removed.
    A symbolic link at ``path`` is followed; a folder there is refused (a `UserError`).
    """
    path = output_path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the name of a file to write")
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


def replace_folder(folder: str | os.PathLike, build: Callable[[Path], object], owned: Sequence[str]) -> None:
    """Build a new ``folder`` beside it, then swap it in: a reader, or a kill at any moment, sees
    the old folder or the complete new one, never a mix, and nothing of the old one survives.

    ``build(partial)`` fills the new folder. ``owned``: name patterns the folder may hold; an
    existing folder holding anything else is refused (a `UserError`) rather than replaced. The
    swap is one atomic exchange where the kernel offers it (Linux ``renameat2``), else two renames.
    A full disk is a `DiskFullError`; leftovers of a killed run are removed by the next one. A
    symbolic link to the folder is followed. A command takes the lock of its output (`writing`).
    """
    folder = output_path(folder)
    partial, old = folder.with_name(f".{folder.name}.partial"), folder.with_name(f".{folder.name}.old")
    if folder.is_dir() and (foreign := [p.name for p in folder.iterdir() if not _matches(p.name, owned)]):
        raise UserError(
            f"{folder} holds files this tool did not write ({listing(sorted(foreign), 5)}); "
            "choose a new or empty folder"
        )
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; choose a folder")
    if not folder.exists() and old.is_dir():
        os.replace(old, folder)  # a run killed between the two renames of the fallback swap
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        build(partial)
        if not folder.exists():
            os.replace(partial, folder)
        elif _exchange(partial, folder):
            shutil.rmtree(partial)  # now the old folder
        else:
            os.replace(folder, old)
            os.replace(partial, folder)
            shutil.rmtree(old)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{folder}: the disk is full ({error.strerror}); free space, rerun") from None
        raise


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
