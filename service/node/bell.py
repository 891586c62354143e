"""A wake-up between the processes of one node: a datagram on a Linux abstract UNIX socket.

The sender process waits on the outbox bell between passes; a worker rings it once its outputs
are committed to the outbox, so a result leaves at once rather than at the sender's next look.
A ring is only a hint: a ring nobody hears (no sender yet, a full socket buffer) is dropped, and
the sender still looks at the outbox every ``delivery.POLL_SECONDS``. Abstract socket names live
in the network namespace, not on disk: nothing to clean up, no path length limit; the name is
derived from the node's data folder, so two nodes on one machine have two bells.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
from pathlib import Path

__all__ = ["Bell", "outbox_bell"]


class Bell:
    """One named bell: :meth:`listen` once in the process that waits, :meth:`ring` from any other."""

    def __init__(self, data_dir: Path, name: str) -> None:
        digest = hashlib.sha256(os.fsencode(os.path.abspath(data_dir))).hexdigest()[:24]
        self.address = f"\0pacs-xai-{digest}-{name}"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._listening = False

    def listen(self) -> None:
        """Bind the bell's name; only one process at a time can (OSError: address in use)."""
        self._socket.bind(self.address)
        self._listening = True

    def wait(self, timeout: float) -> bool:
        """Up to ``timeout`` seconds for a ring; True when one came (every ring waiting is taken)."""
        if not self._listening:
            raise RuntimeError("wait() on a bell that does not listen: call listen() first")
        readable, _, _ = select.select([self._socket], [], [], timeout)
        if not readable:
            return False
        while True:
            try:
                self._socket.recv(16)
            except BlockingIOError:
                return True

    def ring(self) -> None:
        """Wake the listener, if there is one; never blocks, never raises."""
        try:
            self._socket.sendto(b"!", self.address)
        except OSError:  # nobody listens (ECONNREFUSED), or its buffer is full (EAGAIN): a hint only
            pass

    def close(self) -> None:
        self._socket.close()


def outbox_bell(data_dir: Path) -> Bell:
    """The bell of the node in ``data_dir`` that workers ring when outputs are in the outbox, and
    the sender process waits on."""
    return Bell(data_dir, "outbox")
