"""The node's durable state: the spool (files) and the journal (SQLite in WAL mode).

Nothing is acknowledged that is not stored. The receive path is::

    path = spool.write_instance(data, study_uid=..., series_uid=..., sop_uid=...)   # temp, fsync, rename
    journal.record_received(ReceivedInstance(..., path=path, ...))                  # committed, fsynced
    return 0x0000                                                                   # only now

and any :class:`StoreError` on the way is answered with a failure status (out of resources), never
Success. A UID that is not a DICOM UID raises :class:`InvalidUIDError` (a :class:`StoreError`) so the
receiver can tell "cannot understand" apart from "disk full".

One module per job: :mod:`~service.node.store.spool` (atomic durable files, durability modes, and
the invariant kept across SIGKILL), :mod:`~service.node.store.connection` (the shared SQLite
connection and its transactions), :mod:`~service.node.store.journal` (schema, instance rows,
re-sent instances), :mod:`~service.node.store.outbox` (outputs per destination, purge),
:mod:`~service.node.store.quarantine` (bytes that could not be understood),
:mod:`~service.node.store.series` (series assembly and worker claims when the node runs in several processes),
:mod:`~service.node.store.retry` (backoff) and :mod:`~service.node.store.errors`.
"""

from service.node.store.errors import InvalidUIDError, StoreError, validate_uid
from service.node.store.journal import INSTANCE_STATES, SCHEMA_VERSION, Journal, ReceivedInstance
from service.node.store.outbox import OUTBOX_STATES, NewOutput, Outbox, OutboxEntry
from service.node.store.quarantine import Quarantine, QuarantineEntry
from service.node.store.retry import backoff_delay
from service.node.store.series import ReadySeries, SeriesClaims, thread_claimant
from service.node.store.spool import DURABILITY_MODES, Durability, Spool

__all__ = [
    "DURABILITY_MODES",
    "INSTANCE_STATES",
    "OUTBOX_STATES",
    "SCHEMA_VERSION",
    "Durability",
    "InvalidUIDError",
    "Journal",
    "NewOutput",
    "Outbox",
    "OutboxEntry",
    "Quarantine",
    "QuarantineEntry",
    "ReadySeries",
    "ReceivedInstance",
    "SeriesClaims",
    "Spool",
    "StoreError",
    "backoff_delay",
    "thread_claimant",
    "validate_uid",
]
