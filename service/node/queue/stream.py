"""The stream of journaled instances on Redis: what a message holds, publishing, reading through
the consumer group, reclaiming, acknowledging, and the done notes back to the receiving node.

One message per journaled instance, published after its journal commit (never before): the
node's name (whose journal holds the instance), its four UIDs, the spool path relative to the
spool root (workers on other machines resolve it against their mount of the shared spool), the
calling AE, the association and the Unix time it was received. No patient data: UIDs at most.

A worker reads with ``XREADGROUP`` as consumer ``<worker>-<thread>``, refreshes the messages it
holds well within ``queue.reclaim_idle_seconds`` (``XCLAIM ... JUSTID`` to itself), takes over
messages left pending longer than that by a consumer that died (``XAUTOCLAIM``), and
acknowledges (``XACK``) only after the instance's outputs are in its journal's outbox. A worker
whose journal is not the receiving node's sends a done note (``<stream>:done:<node>``) with the
``XACK`` (one ``MULTI``/``EXEC`` per batch), which the receiving node applies to its journal
(:mod:`service.node.queue.refill`).

Every Redis error is a :class:`QueueError` naming the server and what failed; callers wait and
try again (the journal holds everything, so nothing is lost while Redis is away).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.node.store import NewOutput, OutboxEntry, ReceivedInstance

log = logging.getLogger(__name__)

__all__ = [
    "DoneNote",
    "NoteToSend",
    "QueueCollector",
    "QueueError",
    "QueueMessage",
    "WorkQueue",
    "default_node_name",
]

#: Connection and socket timeouts, seconds (a read blocks for its own ``block`` on top of this).
SOCKET_TIMEOUT_SECONDS = 10.0
#: Time to live of the marker that says messages were handed to a consumer (a dead consumer's
#: marker goes away; its messages are reclaimed in any case), seconds.
HANDED_MARKER_SECONDS = 3600

#: KEYS: the stream, then series owner keys; ARGV: group, consumer, owner time to live (ms), then
#: message IDs. Each message still pending with this consumer is claimed again by it (XCLAIM
#: JUSTID: idle time 0, delivery count unchanged); one another consumer took over meanwhile is
#: left alone. Each owner key still naming this consumer gets its time to live again. One
#: script, so nothing changes hands between the look and the claim.
_REFRESH = """
local refreshed = 0
for i = 4, #ARGV do
    local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
    if entry and entry[2] == ARGV[2] then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
        refreshed = refreshed + 1
    end
end
for i = 2, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[2] then
        redis.call('PEXPIRE', KEYS[i], ARGV[3])
    end
end
return refreshed
"""


class QueueError(RuntimeError):
    """Redis could not be reached or refused a command; the message names the server and the command."""


def default_node_name() -> str:
    """This node's name in its messages when ``queue.node_name`` is not set: the host name."""
    return socket.gethostname() or "node"


@dataclass(frozen=True)
class QueueMessage:
    """One message of the stream: its id and the instance it announces."""

    message_id: str
    node: str
    instance: ReceivedInstance


@dataclass(frozen=True)
class NoteToSend:
    """A done note a worker sends with its acknowledgement (:meth:`WorkQueue.ack`): ``node``'s
    instance, its outcome and the outbox rows its sender is to deliver."""

    node: str
    instance: ReceivedInstance
    outcome: str
    reason: str
    outputs: Sequence[OutboxEntry] = ()


@dataclass(frozen=True)
class DoneNote:
    """A worker processed an instance of ``node``'s journal: its outcome and the outputs to deliver
    (files in the shared spool), for the receiving node's journal and sender."""

    note_id: str
    sop_instance_uid: str
    received_at: float
    outcome: str
    reason: str
    outputs: tuple[NewOutput, ...] = ()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WorkQueue:
    """The stream, its consumer group and the done notes on one Redis (``queue`` section of the config)."""

    def __init__(self, url: str, *, stream: str, group: str, spool_root: Path, read_count: int = 64) -> None:
        self.url = url
        self.stream = stream
        self.group = group
        self.spool_root = Path(os.path.abspath(spool_root))  # the spool writes absolute paths
        self.read_count = read_count
        self._redis = redis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_SECONDS, socket_connect_timeout=SOCKET_TIMEOUT_SECONDS
        )
        self._where = redis_address(url)
        self._refresh = self._redis.register_script(_REFRESH)

    def close(self) -> None:
        self._redis.close()

    def _call(self, what: str, command, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        try:
            return command(*args, **kwargs)
        except redis.RedisError as exc:
            raise QueueError(f"Redis at {self._where}: {what} failed: {type(exc).__name__}: {exc}") from exc

    # --------------------------------------------------------------------------------- the stream

    def ensure_group(self) -> bool:
        """Create the stream and its consumer group when missing (reading from the stream's start);
        ``True`` when the group was created now (an emptied or new Redis: the caller refills it)."""
        try:
            self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise QueueError(f"Redis at {self._where}: creating group {self.group} failed: {exc}") from exc
        except redis.RedisError as exc:
            raise QueueError(f"Redis at {self._where}: creating group {self.group} failed: {exc}") from exc
        return True

    def group_exists(self) -> bool:
        """Whether the stream and its consumer group exist (a Redis restarted empty has neither)."""
        try:
            groups = self._redis.xinfo_groups(self.stream)
        except redis.ResponseError:  # ERR no such key
            return False
        except redis.RedisError as exc:
            raise QueueError(f"Redis at {self._where}: reading the groups of {self.stream} failed: {exc}") from exc
        return any(_text(group["name"]) == self.group for group in groups)

    def publish(self, node: str, instance: ReceivedInstance) -> str:
        """``XADD`` one journaled instance (call it after the journal commit); returns the message id."""
        (message_id,) = self.publish_many(node, [instance])
        return message_id

    def publish_many(self, node: str, instances: Sequence[ReceivedInstance]) -> list[str]:
        """``XADD`` journaled instances in one round trip (Redis fsyncs its AOF once for them all)."""
        pipe = self._redis.pipeline(transaction=False)
        for instance in instances:
            pipe.xadd(
                self.stream,
                {
                    "node": node,
                    "sop": instance.sop_instance_uid,
                    "class": instance.sop_class_uid,
                    "study": instance.study_instance_uid,
                    "series": instance.series_instance_uid,
                    "path": self._relative(instance.path),
                    "ae": instance.calling_ae,
                    "assoc": instance.association_id,
                    "at": repr(instance.received_at),
                },
            )
        return [_text(message_id) for message_id in self._call(f"XADD to {self.stream}", pipe.execute)]

    def _relative(self, path: Path) -> str:
        """A spool path as sent: relative to the spool root (absolute when outside it, for a peer
        that sees the same path)."""
        try:
            return str(Path(path).relative_to(self.spool_root))
        except ValueError:
            return str(path)

    def _absolute(self, sent: str) -> Path:
        """A path as sent, under this machine's spool root."""
        path = Path(sent)
        return path if path.is_absolute() else self.spool_root / path

    def _messages(self, entries: Iterable[tuple[bytes | str, dict | None]]) -> list[QueueMessage]:
        """The messages of stream entries (deleted ones, without fields, left out). An entry that
        is not a pacs-xai message (a field missing or unreadable) is acknowledged and logged by
        its ID, not raised: every consumer reclaiming it in turn would stop on it."""
        messages, malformed = [], []
        for message_id, fields in entries:
            if not fields:
                continue
            try:
                messages.append(self._message(message_id, fields))
            except (KeyError, ValueError):
                malformed.append(_text(message_id))
        if malformed:
            log.error(
                "stream %s: %d entries that are not pacs-xai messages acknowledged: %s",
                self.stream,
                len(malformed),
                ", ".join(malformed[:10]),
            )
            self.ack(malformed)
        return messages

    def _message(self, message_id: bytes | str, fields: dict) -> QueueMessage:
        f = {_text(k): _text(v) for k, v in fields.items()}
        instance = ReceivedInstance(
            sop_instance_uid=f["sop"],
            sop_class_uid=f["class"],
            study_instance_uid=f["study"],
            series_instance_uid=f["series"],
            path=self._absolute(f["path"]),
            calling_ae=f["ae"],
            association_id=f["assoc"],
            received_at=float(f["at"]),
        )
        return QueueMessage(_text(message_id), f["node"], instance)

    def read(self, consumer: str, *, block_seconds: float) -> list[QueueMessage]:
        """New messages for ``consumer`` (``XREADGROUP >``), waiting up to ``block_seconds`` for one."""
        messages, _ = self.poll(consumer, block_seconds=block_seconds, handed=False)
        return messages

    def poll(self, consumer: str, *, block_seconds: float, handed: bool = True) -> tuple[list[QueueMessage], bool]:
        """New messages for ``consumer`` (``XREADGROUP >``, waiting up to ``block_seconds`` for
        one) and, in the same round trip, whether another consumer handed it messages since the
        last look (:meth:`transfer`'s marker, taken: then :meth:`read_own_pending` finds them)."""
        pipe = self._redis.pipeline(transaction=False)
        if handed:
            pipe.delete(self._handed_key(consumer))
        pipe.xreadgroup(
            self.group, consumer, {self.stream: ">"}, count=self.read_count, block=max(1, int(block_seconds * 1000))
        )
        replies = self._call(f"XREADGROUP on {self.stream}", pipe.execute)
        reply = replies[-1]
        messages = self._messages(entry for _, entries in reply or [] for entry in entries)
        return messages, bool(handed and replies[0])

    def was_handed(self, consumer: str) -> bool:
        """Whether another consumer handed ``consumer`` messages since the last look (the marker is taken)."""
        return bool(self._call("DEL of a handed marker", self._redis.delete, self._handed_key(consumer)))

    def _handed_key(self, consumer: str) -> str:
        return f"{self.stream}:handed:{consumer}"

    def reclaim(self, consumer: str, *, min_idle_seconds: float) -> list[QueueMessage]:
        """Messages pending longer than ``min_idle_seconds`` with any consumer, now ``consumer``'s (``XAUTOCLAIM``)."""
        taken: list[QueueMessage] = []
        start = "0-0"
        while True:
            reply = self._call(
                f"XAUTOCLAIM on {self.stream}",
                self._redis.xautoclaim,
                self.stream,
                self.group,
                consumer,
                int(min_idle_seconds * 1000),
                start_id=start,
                count=self.read_count,
            )
            start, entries = _text(reply[0]), reply[1]
            taken.extend(self._messages(entries))
            if start == "0-0":
                return taken

    def ack(self, message_ids: Sequence[str], notes: Sequence[NoteToSend] = ()) -> int:
        """``XACK`` (and delete) these messages: their instances' outputs are in an outbox. With
        ``notes``, the done notes are written first, in the same ``MULTI``/``EXEC``: one round trip
        for a whole batch, and the acknowledgement never without its notes. Returns how many
        messages were acknowledged."""
        if not message_ids and not notes:
            return 0
        pipe = self._redis.pipeline(transaction=bool(notes))
        for note in notes:
            pipe.xadd(self._done_stream(note.node), self._note_fields(note))
        if message_ids:
            pipe.xack(self.stream, self.group, *message_ids)
            pipe.xdel(self.stream, *message_ids)
        replies = self._call(f"XACK on {self.stream}" + (" with done notes" if notes else ""), pipe.execute)
        return int(replies[len(notes)]) if message_ids else 0

    def refresh(
        self,
        consumer: str,
        message_ids: Sequence[str],
        series: Sequence[tuple[str, str]] = (),
        *,
        ttl_seconds: float,
    ) -> int:
        """``consumer`` still holds these messages and assembles these series (study, series):
        their idle time starts again, so no other consumer reclaims them while it waits or
        processes (``XCLAIM ... JUSTID`` to itself), and its series owner keys live ``ttl_seconds``
        more. Messages and series another consumer has taken over are left to it. Returns how
        many messages were refreshed; one round trip."""
        if not message_ids and not series:
            return 0
        keys = [self.stream, *(self._owner_key(study, uid) for study, uid in series)]
        args = [self.group, consumer, max(1, int(ttl_seconds * 1000)), *message_ids]
        return int(self._call(f"refreshing the messages of {consumer}", self._refresh, keys=keys, args=args))

    def read_own_pending(self, consumer: str) -> list[QueueMessage]:
        """Every message pending with ``consumer`` (``XREADGROUP 0``): what it holds, and what
        other consumers handed it (:meth:`transfer`)."""
        reply = self._call(
            f"XREADGROUP 0 on {self.stream}",
            self._redis.xreadgroup,
            self.group,
            consumer,
            {self.stream: "0"},
            count=10000,
        )
        return self._messages(entry for _, entries in reply or [] for entry in entries)

    def transfer(self, message_ids: Sequence[str], consumer: str) -> None:
        """Hand pending messages to another consumer (``XCLAIM`` with min idle 0, on its behalf)
        and mark that it was handed some (:meth:`poll`), in one round trip. Should the marker be
        missed, the messages are reclaimed after ``reclaim_idle_seconds`` like any other."""
        if message_ids:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xclaim(self.stream, self.group, consumer, 0, list(message_ids), justid=True)
            pipe.set(self._handed_key(consumer), 1, ex=HANDED_MARKER_SECONDS)
            self._call(f"XCLAIM to {consumer}", pipe.execute)

    # ------------------------------------------------------------------------- series ownership

    def _owner_key(self, study: str, series: str) -> str:
        return f"{self.stream}:owner:{study}:{series}"

    def own_series(self, consumer: str, study: str, series: str, *, ttl_seconds: float, force: bool = False) -> str:
        """The consumer that assembles this series: ``consumer`` when no live one does (or with
        ``force``: it took over a dead one's messages); the key expires after ``ttl_seconds``."""
        key = self._owner_key(study, series)
        ttl = max(1, int(ttl_seconds * 1000))
        for _ in range(3):
            if self._call("SET of a series owner", self._redis.set, key, consumer, px=ttl, nx=not force):
                return consumer
            owner = self._call("GET of a series owner", self._redis.get, key)
            if owner is not None:
                return _text(owner)
        return consumer  # the key keeps expiring under us: take it as ours

    def release_series(self, consumer: str, study: str, series: str) -> None:
        """The series is processed: a later instance of it may go to any consumer."""
        key = self._owner_key(study, series)
        owner = self._call("GET of a series owner", self._redis.get, key)
        if owner is not None and _text(owner) == consumer:
            self._call("DEL of a series owner", self._redis.delete, key)

    def forget_consumer(self, consumer: str) -> bool:
        """Remove a consumer that stopped, if nothing is pending with it (Redis would drop its
        pending entries with it: they are left for another worker to reclaim instead); returns
        whether it was removed."""
        pending = self._call(
            f"XPENDING of {consumer}",
            self._redis.xpending_range,
            self.stream,
            self.group,
            min="-",
            max="+",
            count=1,
            consumername=consumer,
        )
        if pending:
            return False
        self._call(f"XGROUP DELCONSUMER {consumer}", self._redis.xgroup_delconsumer, self.stream, self.group, consumer)
        return True

    def lag(self) -> tuple[int, int]:
        """(messages not yet delivered to any consumer, messages delivered and not acknowledged)."""
        try:
            groups = self._redis.xinfo_groups(self.stream)
        except redis.ResponseError:
            return 0, 0
        except redis.RedisError as exc:
            raise QueueError(f"Redis at {self._where}: reading the groups of {self.stream} failed: {exc}") from exc
        for group in groups:
            if _text(group["name"]) == self.group:
                # Acknowledged messages are deleted (:meth:`ack`), so what the stream still holds is
                # pending or not yet delivered (Redis's own "lag" is unknown once entries are deleted).
                pending = int(group["pending"])
                length = int(self._call(f"XLEN of {self.stream}", self._redis.xlen, self.stream))
                return max(0, length - pending), pending
        return 0, 0

    # ------------------------------------------------------------------------------- done notes

    def _done_stream(self, node: str) -> str:
        return f"{self.stream}:done:{node}"

    def note_done(
        self, node: str, instance: ReceivedInstance, outcome: str, reason: str, outputs: Sequence[OutboxEntry] = ()
    ) -> None:
        """Tell ``node`` that its instance was processed, with the outputs its sender is to deliver
        (a worker whose journal is not ``node``'s; a worker sends its notes with :meth:`ack`)."""
        note = NoteToSend(node, instance, outcome, reason, outputs)
        self._call("XADD of a done note", self._redis.xadd, self._done_stream(node), self._note_fields(note))

    def _note_fields(self, note: NoteToSend) -> dict[str, str]:
        listed = [
            {
                "uid": o.sop_instance_uid,
                "destination": o.destination,
                "path": self._relative(o.path),
                "kind": o.kind,
                "method": o.method,
            }
            for o in note.outputs
        ]
        return {
            "sop": note.instance.sop_instance_uid,
            "at": repr(note.instance.received_at),
            "outcome": note.outcome,
            "reason": note.reason[:1000],
            "outputs": json.dumps(listed),
        }

    def done_notes(self, node: str, count: int = 1000) -> list[DoneNote]:
        """The oldest done notes for ``node`` not yet dropped."""
        reply = self._call("XRANGE of the done notes", self._redis.xrange, self._done_stream(node), count=count)
        notes = []
        for note_id, raw in reply:
            f = {_text(k): _text(v) for k, v in raw.items()}
            outputs = tuple(
                NewOutput(o["uid"], f["sop"], o["destination"], self._absolute(o["path"]), o["kind"], o["method"])
                for o in json.loads(f.get("outputs") or "[]")
            )
            notes.append(DoneNote(_text(note_id), f["sop"], float(f["at"]), f["outcome"], f.get("reason", ""), outputs))
        return notes

    def drop_done_notes(self, node: str, note_ids: Sequence[str]) -> None:
        """The notes are in ``node``'s journal: delete them."""
        if note_ids:
            self._call("XDEL of done notes", self._redis.xdel, self._done_stream(node), *note_ids)


def redis_address(url: str) -> str:
    """``host:port/db`` of a Redis URL, without a password (for messages and logs)."""
    try:
        kwargs = redis.connection.parse_url(url)
    except ValueError:
        return "<an invalid redis URL>"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class QueueCollector(Collector):
    """``pacsxai_queue_lag`` (messages not yet delivered to a worker) and ``pacsxai_queue_pending``
    (delivered, not yet acknowledged), read from Redis at scrape time; nothing when Redis is away."""

    def __init__(self, queue: WorkQueue) -> None:
        self._queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            lag, pending = self._queue.lag()
        except QueueError:
            return
        yield GaugeMetricFamily(
            "pacsxai_queue_lag", "Instances in the Redis stream not yet delivered to any worker.", value=lag
        )
        yield GaugeMetricFamily(
            "pacsxai_queue_pending", "Instances delivered to a worker and not yet acknowledged.", value=pending
        )
