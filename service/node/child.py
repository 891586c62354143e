"""What every process of a multi-process node does first: read its configuration, die with its
supervisor, log like it, and turn SIGTERM into a graceful stop.

A child is started by :class:`service.node.supervisor.Supervisor` as
``python -m service.node.<role> --config FILE --name NAME``; ``FILE`` is the supervisor's resolved
configuration (JSON, which is YAML) and ``NAME`` the child's slot (``receiver-0``, ``worker-1``,
``sender``). Its *identity* in the journal is ``NAME:PID``, so the supervisor can release exactly
what a dead child held.

On Linux the child asks the kernel for SIGKILL when its supervisor dies (``PR_SET_PDEATHSIG``):
a supervisor killed with SIGKILL takes the whole node down at once, as a single process would,
and the next start resumes from the journal.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from service.node.config import NodeConfig, load_resolved_config
from service.node.logs import configure_logging

log = logging.getLogger(__name__)

#: Environment variable naming the supervisor's pid: a child whose parent is already another
#: process (its supervisor died before it could ask for PR_SET_PDEATHSIG) exits at once.
SUPERVISOR_PID_ENV = "PACS_XAI_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1

#: A role's body: (configuration, identity, stop event) -> exit status.
RoleMain = Callable[[NodeConfig, str, threading.Event], int]


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning(
            "prctl(PR_SET_PDEATHSIG) failed (errno %d): this process outlives its supervisor", ctypes.get_errno()
        )
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(0)  # the supervisor is gone already


def run_child(role: str, body: RoleMain, argv: Sequence[str] | None = None) -> int:
    """Parse ``--config FILE --name NAME``, set the process up, run ``body`` until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog=f"python -m service.node.{role}",
        description=f"One {role} process of a multi-process pacs-xai node (started by pacs-xai serve).",
        epilog=f"example:\n  python -m service.node.{role} --config var/run/config.json --name {role}-0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, metavar="FILE", help="the supervisor's configuration")
    parser.add_argument("--name", required=True, metavar="NAME", help="this process's slot, e.g. receiver-0")
    args = parser.parse_args(argv)
    die_with_parent()
    config = load_resolved_config(args.config)
    configure_logging(config.logging.level, json_format=config.logging.json_format)
    Path(config.storage.data_dir).mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    identity = f"{args.name}:{os.getpid()}"
    threading.current_thread().name = args.name
    log.info("%s started (pid %d)", args.name, os.getpid())
    status = body(config, identity, stop)
    log.info("%s stopped", args.name)
    return status
