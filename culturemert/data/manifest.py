"""fairseq audio manifests: ``{split}.tsv`` listing the clips of a pre-training set.

Format (the one fairseq's audio tasks read): the first line is the root folder; every further
line is ``relative/path<TAB>num_samples`` of a 24 kHz mono file under that root. A file listed
twice is refused: it would be trained on (and tokenised) twice without anyone asking for it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from culturemert.errors import UserError
from culturemert.files import write_atomically


class ManifestError(UserError):
    """A manifest that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Manifest:
    """The parsed contents of one manifest file."""

    path: Path
    root: Path
    files: list[str]
    num_samples: np.ndarray  # int64 [len(files)]

    def __len__(self) -> int:
        return len(self.files)

    def audio_path(self, index: int) -> Path:
        return self.root / self.files[index]

    def checksum(self) -> str:
        """sha256 of the manifest's bytes: ties a token cache to the exact clip list."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse a manifest; refuse a missing or empty file, malformed lines and a file listed twice,
    naming them."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest; run scripts/prepare_data.py to write it")
    lines = path.read_text().splitlines()
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}: empty manifest; its first line must be the audio root folder")
    files, lengths, first_line = [], [], {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise ManifestError(f"{path}:{number}: expected 'relative/path<TAB>num_samples', got {line!r}")
        if parts[0] in first_line:
            raise ManifestError(
                f"{path}:{number}: {parts[0]!r} is listed again (first on line {first_line[parts[0]]}); "
                "remove the repeated line"
            )
        first_line[parts[0]] = number
        files.append(parts[0])
        lengths.append(int(parts[1]))
    if not files:
        raise ManifestError(f"{path}: lists no audio files (only the root line)")
    return Manifest(path, Path(lines[0].strip()), files, np.asarray(lengths, dtype=np.int64))


def write_manifest(path: str | os.PathLike, root: str | os.PathLike, entries: list[tuple[str, int]]) -> None:
    """Write ``entries`` of (path relative to ``root``, num_samples) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{name}\t{length}\n" for name, length in entries)
    write_atomically(path, lambda handle: handle.write(f"{Path(root).resolve()}\n{body}".encode()))
