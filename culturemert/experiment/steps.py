"""Steps of an experiment that run only what is missing.

A step owns one folder. It is done when its outputs exist and the folder's ``step.json`` says
``done`` with the fingerprint of its current inputs: its settings, the content of the external
files it reads and the fingerprints of the steps it depends on. ``step.json`` is written (as
``running``) before the step's tool starts and (as ``done``) after it returns, atomically:

- done, same fingerprint, outputs present: skipped;
- running with the same fingerprint (the driver was killed): rerun in place, and the tool resumes
  from its own atomically written state (run_cpt.sh's checkpoints, probe extraction parts);
- anything else (another fingerprint, no step.json beside existing files): the folder cannot be
  proved to belong to these inputs, so it is removed and the step runs afresh.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import culturemert
from culturemert.cli import run as run_cli
from culturemert.errors import UserError
from culturemert.files import write_json_atomically
from culturemert.fingerprint import file_sha256

logger = logging.getLogger(__name__)

REPO = Path(culturemert.__file__).resolve().parents[1]
STEP_FILE = "step.json"
LOG_TAIL = 20  # lines of a failed command's log repeated in the error


class StepError(UserError):
    """A step whose tool failed; the message names the step and its log."""


def call_tool(tool: str, arguments: Sequence[object]) -> None:
    """Run ``python scripts/<tool>.py ARGUMENTS`` in this process (``culturemert.cli.<tool>``,
    saving an interpreter start-up per call); a failure is a `StepError`."""
    argv = [str(argument) for argument in arguments]
    logger.info("$ python scripts/%s.py %s", tool, " ".join(argv))
    status = run_cli(importlib.import_module(f"culturemert.cli.{tool}").main, tool, argv)
    if status != 0:
        raise StepError(f"scripts/{tool}.py {' '.join(argv)} failed (exit {status})")


@contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's output (print, logging, progress bars) to `log`, appended, while a
    step runs; the console keeps the driver's one line per step."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle, redirect_stdout(handle), redirect_stderr(handle):
        to_log = logging.StreamHandler(handle)
        if handlers:
            to_log.setFormatter(handlers[0].formatter)
        root.handlers = [to_log]
        try:
            yield
        finally:
            root.handlers, root.level = handlers, level


def log_tail(log: Path) -> str:
    """The last `LOG_TAIL` lines of `log`, indented, for an error message."""
    return "\n  ".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])


def run_command(command: Sequence[object], log: Path, env: dict[str, str] | None = None) -> None:
    """Run `command` in a subprocess with its output in `log` (appended, so a resumed step keeps
    the history); a failure is a `StepError` quoting the log's last lines."""
    command = [str(part) for part in command]
    logger.info("$ %s (log: %s)", " ".join(command), log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        status = subprocess.run(
            command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        ).returncode
    if status != 0:
        raise StepError(f"{' '.join(command)} failed (exit {status}); the end of {log}:\n  {log_tail(log)}")


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's content, or of a folder's listing (relative path, size, mtime) for a
    folder of audio too large to read at every run."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        file_sha256(path, digest)
    elif path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            digest.update(f"{item.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        raise StepError(f"{path}: input not found; fix the path in the experiment file")
    return digest.hexdigest()


@dataclass
class Step:
    """One unit of work (module docstring). `action` runs the tool; `outputs` exist when done."""

    name: str
    folder: Path
    action: Callable[[], None]
    outputs: list[Path]
    settings: dict = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)  # external files or folders read
    after: list[str] = field(default_factory=list)  # names of the steps it depends on


class Runner:
    """Runs steps in order, skipping the done ones; remembers each step's fingerprint. Prints one
    line per step it runs: its number of `total` (the planned steps), the wall time since the
    runner started and the step's log (``<folder>.log``, beside the step's folder), where the
    step's tools write everything they print."""

    def __init__(self, total: int = 0) -> None:
        self.fingerprints: dict[str, str] = {}
        self.ran: list[str] = []
        self.total = total
        self.started = time.monotonic()

    def fingerprint(self, step: Step) -> str:
        missing = [name for name in step.after if name not in self.fingerprints]
        if missing:
            raise StepError(f"step {step.name} depends on steps that have not run: {missing}")
        record = {
            "settings": step.settings,
            "inputs": {str(path): file_fingerprint(path) for path in step.inputs},
            "after": {name: self.fingerprints[name] for name in step.after},
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()

    def run(self, steps: Iterable[Step]) -> None:
        for step in steps:
            self.run_step(step)

    def run_step(self, step: Step) -> None:
        fingerprint = self.fingerprint(step)
        record_path = step.folder / STEP_FILE
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        same = record is not None and record.get("fingerprint") == fingerprint
        if same and record.get("status") == "done" and all(path.exists() for path in step.outputs):
            logger.debug("%s: done", step.name)
        else:
            state = "resuming" if same else "running"
            if not same and step.folder.exists():
                state = "its inputs changed" if record else f"no {STEP_FILE} proves what made it"
                state = f"removed its folder: {state}"
                shutil.rmtree(step.folder)
            minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
            number = len(self.fingerprints) + 1
            log = step.folder.with_name(step.folder.name + ".log")
            print(
                f"[{number:3d}/{max(self.total, number)} {minutes:3d}:{seconds:02d}] {step.name}"
                + ("" if state == "running" else f" ({state})")
                + f"  log: {log}",
                flush=True,
            )
            step.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomically(record_path, {"status": "running", "fingerprint": fingerprint})
            try:
                with output_to(log):
                    step.action()
            except StepError as error:
                raise StepError(f"step {step.name}: {error}; the end of {log}:\n  {log_tail(log)}") from None
            absent = [str(path) for path in step.outputs if not path.exists()]
            if absent:
                raise StepError(f"step {step.name} finished without writing {absent}")
            write_json_atomically(
                record_path,
                {"status": "done", "fingerprint": fingerprint, "settings": step.settings},
            )
            self.ran.append(step.name)
        self.fingerprints[step.name] = fingerprint
