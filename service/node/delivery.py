"""The sender process of a multi-process node: delivers the outbox the workers fill.

One sender per node (the outbox is per destination, one association per pass, as with one
process). Between passes it waits on the outbox bell (:mod:`service.node.bell`), which a worker
rings when it has committed outputs, and looks at the outbox anyway every ``POLL_SECONDS`` (an
indexed read of the due rows: retries that came due, a ring that was lost). SIGTERM: one last
pass, then exit; what is left waits in the journal.

Run by the supervisor: ``python -m service.node.delivery --config FILE --name sender``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from dicom_io.net.scu import StoreSCU
from service.node.bell import Bell, outbox_bell
from service.node.child import run_child
from service.node.config import NodeConfig
from service.node.metrics import create_metrics
from service.node.sender import OutboxSender
from service.node.store import Journal

#: Seconds between looks at the outbox when the last pass sent nothing and no worker rang.
POLL_SECONDS = 0.25
#: The same without a bell (its name was taken: an earlier sender of this node still runs).
POLL_SECONDS_WITHOUT_BELL = 0.02

log = logging.getLogger(__name__)


def serve_sender(config: NodeConfig, identity: str, stop: threading.Event) -> int:
    journal = Journal(Path(config.storage.data_dir) / "journal.sqlite", durability=config.storage.durability)
    bell = outbox_bell(Path(config.storage.data_dir))
    listening = _listen(bell)
    try:
        sender = OutboxSender(
            journal,
            StoreSCU(config.send.calling_ae_title or config.listener.ae_title),
            {d.name: d.to_destination() for d in config.destinations},
            config.send,
            create_metrics(),
        )
        while True:
            stopping = stop.is_set()
            tally = sender.send_pass(stop.wait)
            if stopping:
                return 0
            if not any(tally.values()):
                if listening:
                    bell.wait(POLL_SECONDS)
                else:
                    stop.wait(POLL_SECONDS_WITHOUT_BELL)
    finally:
        bell.close()
        journal.close()


def _listen(bell: Bell) -> bool:
    try:
        bell.listen()
    except OSError as exc:
        log.warning("the outbox bell is taken (%s): looking at the outbox every %.2f s", exc, POLL_SECONDS_WITHOUT_BELL)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    return run_child("delivery", serve_sender, argv)


if __name__ == "__main__":
    sys.exit(main())
