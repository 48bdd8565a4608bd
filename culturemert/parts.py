"""Resumable work in parts: a long job writes each finished part atomically into a ``.partial``
folder beside a record of its settings, and a rerun does only the missing parts (after an
exception or a SIGKILL alike). The token cache and the feature cache both build on it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from culturemert.errors import UserError
from culturemert.files import write_atomically, write_json_atomically


class Parts:
    """``count`` parts of resumable work kept in the folder ``partial``, each an ``.npz`` of
    named arrays. Opening creates the folder with ``settings.json``, or checks that existing
    partial work was made with the same ``settings``, raising ``error`` otherwise."""

    def __init__(self, partial: Path, count: int, settings: dict, error: type[UserError]):
        self.partial = Path(partial)
        self.count = count
        record = self.partial / "settings.json"
        if record.is_file():
            previous = json.loads(record.read_text())
            if previous != settings:
                changed = sorted(key for key in settings if previous.get(key) != settings[key])
                raise error(
                    f"{self.partial} holds partial work made with other {', '.join(changed)}; rerun with "
                    f"the same options to resume, or delete {self.partial} to start over"
                )
            return
        self.partial.mkdir(parents=True, exist_ok=True)
        write_json_atomically(record, settings)

    def path(self, index: int) -> Path:
        return self.partial / f"part-{index:06d}.npz"

    def pending(self) -> list[int]:
        """The parts not written yet, in order."""
        return [index for index in range(self.count) if not self.path(index).is_file()]

    def write(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Write part ``index`` atomically: it is there complete or not at all."""
        write_atomically(self.path(index), lambda handle: np.savez(handle, **arrays))

    def arrays(self, name: str) -> Iterator[np.ndarray]:
        """Array ``name`` of each part in order, one part in memory at a time."""
        for index in range(self.count):
            with np.load(self.path(index)) as part:
                yield part[name]

    def write_joined(self, path: Path, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        """Write the parts' arrays ``name``, joined along the first axis into ``shape`` as
        ``dtype``, to the ``.npy`` file ``path`` atomically, streaming one part at a time."""

        def write(handle: BinaryIO) -> None:
            header = {"descr": dtype, "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(handle, header)
            for array in self.arrays(name):
                handle.write(np.ascontiguousarray(array, dtype=dtype).tobytes())

        write_atomically(path, write)

    def remove(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
