"""The sender process of a multi-process node: delivers the outbox the workers fill.

One sender per node (the outbox is per destination, one association per pass, as with one
process). Workers cannot wake it across processes, so it looks at the outbox every
``POLL_SECONDS`` when a pass sent nothing (an indexed read of the due rows). SIGTERM: one last
pass, then exit; what is left waits in the journal.

Run by the supervisor: ``python -m service.node.delivery --config FILE --name sender``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from dicom_io.net.scu import StoreSCU
from service.node.child import run_child
from service.node.config import NodeConfig
from service.node.metrics import create_metrics
from service.node.sender import OutboxSender
from service.node.store import Journal

#: Seconds between looks at the outbox when the last pass sent nothing.
POLL_SECONDS = 0.02


def serve_sender(config: NodeConfig, identity: str, stop: threading.Event) -> int:
    journal = Journal(Path(config.storage.data_dir) / "journal.sqlite", durability=config.storage.durability)
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
                stop.wait(POLL_SECONDS)
    finally:
        journal.close()


def main(argv: Sequence[str] | None = None) -> int:
    return run_child("delivery", serve_sender, argv)


if __name__ == "__main__":
    sys.exit(main())
