"""A receiver process of a multi-process node: the Storage SCP on the shared DICOM port
(SO_REUSEPORT), spooling and journaling what arrives, nothing else.

It keeps the single process's promise (nothing acknowledged before the file is fsynced and its
journal row committed; the AE allow-list; TLS) and records each association in the journal
(:class:`~service.node.assembler.JournalAssembly`), so a series arriving over associations on
different receivers is assembled as one by the workers. It stays light: it imports neither torch
nor ONNX Runtime nor the model (an import-linter contract and a test check it).

Run by the supervisor: ``python -m service.node.intake --config FILE --name receiver-0``.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from dicom_io.net.scp import AllowedCaller, ListenerSettings, StorageSCP, TlsFiles
from service.node.assembler import JournalAssembly
from service.node.child import run_child
from service.node.config import NodeConfig
from service.node.metrics import create_metrics
from service.node.queue.publish import PublishingAssembly
from service.node.queue.stream import WorkQueue, default_node_name
from service.node.receiver import Receiver
from service.node.store import Journal, Spool


def listener_settings(config: NodeConfig) -> ListenerSettings:
    """The Storage SCP's settings from the node configuration."""
    listener = config.listener
    tls = None
    if config.tls is not None:
        tls = TlsFiles(config.tls.certificate, config.tls.private_key, config.tls.client_ca)
    return ListenerSettings(
        ae_title=listener.ae_title,
        bind_address=listener.bind_address,
        port=listener.port,
        max_associations=listener.max_associations,
        max_pdu=listener.max_pdu,
        acse_timeout=listener.acse_timeout,
        dimse_timeout=listener.dimse_timeout,
        network_timeout=listener.network_timeout,
        max_associations_per_host=listener.max_associations_per_host,
        max_instance_bytes=listener.max_instance_bytes,
        allowed_callers=tuple(AllowedCaller(c.ae_title, c.host) for c in config.allowed_callers),
        tls=tls,
    )


def serve_receiver(config: NodeConfig, identity: str, stop: threading.Event) -> int:
    """Listen until ``stop``; then stop accepting and let open associations finish."""
    data_dir = Path(config.storage.data_dir)
    durability = config.storage.durability
    journal = Journal(data_dir / "journal.sqlite", durability=durability)
    assembly = JournalAssembly(journal, identity)
    queue = config.queue
    if queue.redis_url:  # each journaled instance is also published to the stream (after its commit)
        stream = WorkQueue(queue.redis_url, stream=queue.stream, group=queue.group, spool_root=data_dir / "spool")
        assembly = PublishingAssembly(journal, identity, stream, queue.node_name or default_node_name(), data_dir)
    try:
        spool = Spool(data_dir / "spool", durability=durability)
        # The listener writes each data set to a temporary file as it arrives: in the spool's
        # incoming folder, keeping it is a rename, not a copy (this process does nothing else).
        tempfile.tempdir = str(spool.incoming_dir)
        receiver = Receiver(spool, journal, assembly, create_metrics())
        scp = StorageSCP(dataclasses.replace(listener_settings(config), reuse_port=True), receiver)
        scp.start()
        stop.wait()
        scp.stop()
    finally:
        if isinstance(assembly, PublishingAssembly):
            assembly.close()  # what was journaled is published before the process ends
        journal.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_child("intake", serve_receiver, argv)


if __name__ == "__main__":
    sys.exit(main())
