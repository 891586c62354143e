"""Fault points for the torture suite (test-only): ``PACSXAI_FAULT_POINT=<name>[:<n>]`` in the
environment makes the process SIGKILL itself the n-th time (default: the first) it reaches the
point ``name``, as a power cut or an OOM kill would stop it between two steps.

With ``PACSXAI_FAULT_ONCE=<file>`` as well, the point fires in one process only, once: the process
that fires it first creates ``file`` (exclusively); a process that finds it there goes on. That is
the many-process node's case: every child inherits the variable, the supervisor restarts the one
that was killed, and neither it nor its siblings kill themselves again.

Unset (always, outside tests) a point costs one string comparison. The names, in the order an
instance meets them: see :data:`FAULT_POINTS`. (Here, at the bottom layer, because the sender's
point sits in :mod:`dicom_io.net.scu`, between two C-STOREs of one association.)
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["ENV", "ENV_ONCE", "FAULT_POINTS", "fault_point"]

ENV = "PACSXAI_FAULT_POINT"
ENV_ONCE = "PACSXAI_FAULT_ONCE"
#: Every point, in the order an instance meets them.
FAULT_POINTS = (
    "after-spool-write",  # the received file is in the spool, no journal row yet, no answer sent
    "after-journal",  # journaled, the C-STORE response not yet sent
    "during-processing",  # the instance read back, the model and explainers not yet done
    "after-outputs-stored",  # outputs written and journaled in the outbox, the instance not marked done
    "mid-send",  # one output C-STORE acknowledged by the destination, the next not yet sent
)


def _parse(spec: str) -> tuple[str, int]:
    if not spec:
        return "", 0
    name, _, count = spec.partition(":")
    if name not in FAULT_POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown fault point {name!r}; choose one of {', '.join(FAULT_POINTS)}")
    if count and (not count.isdigit() or int(count) < 1):
        raise ValueError(f"{ENV}={spec!r}: the count after ':' must be a whole number >= 1")
    return name, int(count or 1)


_POINT, _remaining = _parse(os.environ.get(ENV, ""))
_ONCE = os.environ.get(ENV_ONCE, "")
_lock = threading.Lock()


def fault_point(name: str) -> None:
    """SIGKILL this process here if the environment asks for it (see the module docstring)."""
    global _remaining
    if name != _POINT:
        return
    with _lock:
        _remaining -= 1
        if _remaining == 0 and _first_to_fire():
            os.kill(os.getpid(), signal.SIGKILL)


def _first_to_fire() -> bool:
    """Without PACSXAI_FAULT_ONCE always; with it, only for the process that creates its file."""
    if not _ONCE:
        return True
    try:
        os.close(os.open(_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True
