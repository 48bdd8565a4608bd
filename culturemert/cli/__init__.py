"""The command-line tools. Each ``culturemert/cli/<tool>.py`` has ``main(argv) -> int`` and
``entry = command(main, "<tool>")``: ``scripts/<tool>.py`` and the ``[project.scripts]`` entry
points call ``entry``, which sets up logging for the process and runs ``main`` through `run`;
`run` turns a `UserError` into one line on stderr and exit status 2 (tests call it in-process)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from culturemert.errors import UserError

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """One handler on stderr at ``level``, replacing whatever an import configured (fairseq's
    ``wav2vec2_classification`` module calls ``basicConfig(level=DEBUG)`` when imported)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr, force=True)


def run(main: Callable[[list[str] | None], int], prog: str, argv: list[str] | None = None) -> int:
    """Run a tool's ``main``: a user error is one line (``prog: message``) and status 2."""
    try:
        return main(argv)
    except UserError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def command(main: Callable[[list[str] | None], int], prog: str) -> Callable[[], None]:
    """The zero-argument entry point of a tool (``[project.scripts]``, ``scripts/<tool>.py``)."""

    def entry() -> None:
        configure_logging()
        sys.exit(run(main, prog))

    return entry
