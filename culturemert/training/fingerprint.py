"""A run folder knows what it is: the fingerprint of its inputs, and a lock while it is in use.

``<run>/fingerprint.json`` records the content hash of the start checkpoint (INIT), of every
manifest and token cache a stage reads (a cache's ``meta.json`` records the sha256 of the
manifest it was built from), the composed configuration of each stage, the stages made, and
the code version (package version and a hash of the package's sources; the git commit is
recorded for information). A rerun with the same fingerprint resumes or skips what is done;
any difference is refused, naming it. ``<run>/lock`` is held with ``flock`` by the launcher
and the training processes it starts, so a crashed run never leaves it held.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import culturemert
from culturemert.errors import UserError, listing
from culturemert.files import held, write_json_atomically
from culturemert.fingerprint import file_sha256

FINGERPRINT = "fingerprint.json"
LOCK = "lock"
# Recorded for information only: the same inputs from another checkout or path still match.
INFORMATIONAL = ("code.git", "init.path")


class RunFolderError(UserError):
    """A run folder that holds another run's state, or that another process is using."""


def sha256_files(paths: list[Path], root: Path) -> str:
    """One hash over the names (relative to ``root``) and contents of ``paths``."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def code_version() -> dict:
    """Package version, a hash of the package's Python sources, and the git commit if any."""
    package = Path(culturemert.__file__).parent
    try:
        version = importlib.metadata.version("culturemert")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    git = subprocess.run(
        ["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return {
        "version": version,
        "sources": sha256_files(list(package.rglob("*.py")), package),
        "git": git.stdout.strip() if git.returncode == 0 else None,
    }


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _short(value: object) -> str:
    text = json.dumps(value) if value is not None else "absent"
    return text if len(text) <= 40 else text[:37] + "..."


def differences(recorded: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every value that differs, informational keys aside."""
    old, new = _flatten(recorded), _flatten(current)
    keys = sorted(key for key in set(old) | set(new) if not key.startswith(INFORMATIONAL))
    return [
        f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}"
        for key in keys
        if old.get(key) != new.get(key)
    ]


def check_or_record(run: Path, fingerprint: dict) -> bool:
    """Record ``fingerprint`` in a new or empty run folder (True), or check that the folder's
    record equals it (False: a rerun, which resumes). Anything else is a `RunFolderError`."""
    record = run / FINGERPRINT
    afresh = "start afresh with a new NAME, or with RESTART=1 (moves this folder aside)"
    if record.is_file():
        changed = differences(json.loads(record.read_text()), fingerprint)
        if changed:
            raise RunFolderError(
                f"{run} holds a run of other inputs ({listing(changed, 5)}); rerun with the same "
                f"inputs to resume it, or {afresh}"
            )
        return False
    leftovers = sorted(p.name for p in run.iterdir() if p.name != LOCK) if run.is_dir() else []
    if leftovers:
        raise RunFolderError(
            f"{run} holds {listing(leftovers, 5)} but no {FINGERPRINT}, so nothing proves they belong "
            f"to this run; {afresh}"
        )
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomically(record, fingerprint)
    return True


def move_aside(run: Path) -> Path | None:
    """RESTART=1: rename the run folder to ``<run>.replaced-<UTC time>`` (nothing is deleted)."""
    if not run.exists():
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = run.with_name(f"{run.name}.replaced-{stamp}")
    with run_lock(run):
        os.replace(run, target)
    return target


@contextmanager
def run_lock(run: Path) -> Iterator[int]:
    """Hold ``<run>/lock`` (`files.held`); yields its descriptor, for the training processes to
    inherit, so that the lock lasts while any of them runs. Refused at once if it is held."""
    run.mkdir(parents=True, exist_ok=True)
    with held(run / LOCK, str(run), "wait for it to finish, or use another NAME") as descriptor:
        yield descriptor
