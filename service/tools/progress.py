"""Progress lines for long work (training, benchmarks, the demo): the tools report through a
:data:`Progress` callback, the command line prints them with :func:`print_progress`."""

from __future__ import annotations

import sys
from collections.abc import Callable

#: Takes one line for the user, e.g. ``"latency 3/20: 0.451 s"``.
Progress = Callable[[str], None]


def print_progress(message: str) -> None:
    """One progress line on stderr, flushed at once (stdout keeps the results)."""
    print(message, file=sys.stderr, flush=True)
