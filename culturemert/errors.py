"""User-facing errors: a problem with the user's input or files, told in one line.

Every error a user can fix (a bad file, a missing weight, stale state) derives from
`UserError`; the command-line wrapper (`culturemert.cli.run`) prints its message on stderr and
exits with status 2 instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_LISTED = 10  # items named in a message before "and N more"


class UserError(ValueError):
    """A problem the user can fix; the message names the file or value and what to do."""


def listing(items: Sequence[object], limit: int = MAX_LISTED) -> str:
    """``"a, b, c and 7 more"``: the first ``limit`` items of a list for a one-line message."""
    shown = ", ".join(str(item) for item in items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown
