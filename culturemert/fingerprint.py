"""Content fingerprints: which bytes a cache was made from.

A cache records the sha256 of every audio file it was made from (and of the model, for the
feature cache), so it is refused for other audio even when the manifest listing the files is
byte-identical (re-cut segments written under the same names). Hashing reads every byte, so the
per-file hashes are kept beside the cache in ``audio.json`` with each file's size and
modification time: a rerun rehashes only the files whose size or mtime changed. (Rewriting a
file with other bytes of the same size while restoring its nanosecond mtime defeats that
pre-check; nothing in the data preparation does that.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from culturemert.errors import UserError, listing
from culturemert.files import write_json_atomically

HASH_BLOCK = 1 << 24
AUDIO_RECORD = "audio.json"

PathLike = str | os.PathLike


def file_sha256(path: PathLike, digest: hashlib._Hash | None = None) -> str:
    """sha256 of a file's bytes (fed into ``digest`` when given), read in blocks."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def model_sha256(path: PathLike) -> str:
    """sha256 identifying a model: of a fairseq ``.pt`` file, or of an HF folder's file names
    and contents (so a moved or renamed model keeps its identity)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode())
        file_sha256(file, digest)
    return digest.hexdigest()


def _entry(path: Path, known: dict[str, list]) -> list | None:
    """[size, mtime_ns, sha256] of a file (None when missing), reusing `known`'s hash when the
    size and mtime are unchanged."""
    try:
        stat = path.stat()
    except OSError:
        return None
    previous = known.get(str(path))
    if previous is not None and previous[:2] == [stat.st_size, stat.st_mtime_ns]:
        return previous
    return [stat.st_size, stat.st_mtime_ns, file_sha256(path)]


def audio_sha256(files: Sequence[PathLike], cache_dir: Path, error: type[UserError]) -> tuple[str, dict]:
    """One sha256 over the contents of `files` (in order; a missing file counts as missing), and
    the per-file record to keep with `save_record` once the caller accepts the cache's state.

    Raises `error` naming the files whose content differs from the record ``audio.json`` in
    `cache_dir` (left by an earlier run, complete or not, on the same files), so no earlier work
    is reused for other audio. A record of other files (another manifest or task) only saves no
    hashing: the caller compares the digest with the one its cache recorded.
    """
    path = cache_dir / AUDIO_RECORD
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    entries = [_entry(Path(file), recorded) for file in files]
    if set(recorded) == {str(file) for file in files}:
        changed = [
            str(file)
            for file, entry in zip(files, entries)
            if (entry and entry[2]) != (recorded[str(file)] or [None] * 3)[2]
        ]
        if changed:
            raise error(
                f"{cache_dir} was made from other audio: {listing(changed)} changed or went missing "
                f"since; delete {cache_dir} or pass another --out"
            )
    digest = hashlib.sha256()
    for entry in entries:
        digest.update((entry[2] if entry else "missing").encode())
    return digest.hexdigest(), {str(file): entry for file, entry in zip(files, entries)}


def save_record(cache_dir: Path, record: dict) -> None:
    """Keep the per-file record of `audio_sha256` in `cache_dir` for the next run's check."""
    write_json_atomically(cache_dir / AUDIO_RECORD, record)
