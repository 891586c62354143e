"""The spool: the node's files (received instances, quarantined bytes, encoded outputs), each
written atomically and, by default, durably.

Every write goes to a temp file in the final folder, is flushed and fsynced, renamed
(``os.replace``) to its final name, and the folder is fsynced. A reader therefore sees the old
file or the complete new one, never a partial one. A received data set comes as the file the
listener wrote while it arrived (``incoming/``, or wherever ``tempfile`` puts files): it is moved
to the temp name (a rename on the same filesystem, else a copy in the kernel), then the same.

Invariant kept across SIGKILL at any moment: every journal row points to a complete file, because a
file is only renamed to its final name after its bytes are fsynced, and the row is only written
after the rename (and the folder) are fsynced. What a kill can leave behind is harmless: a temp
file (``.*.tmp``, removed by :meth:`Spool.remove_stale_temp_files` at start-up) or a complete file
that no row points to (the sender was never acknowledged, so it will send again).

Durability (``storage.durability``, shared with the journal): ``"power-loss"`` (the default) fsyncs
every file, folder and commit, so an acknowledged instance survives power loss. ``"process-crash"``
leaves the flushing to the operating system (no fsync; SQLite ``synchronous=NORMAL`` in WAL mode):
an acknowledged instance survives SIGKILL and any crash of the node, because the bytes are in the
kernel's page cache before Success is sent, but the last seconds may be lost when the machine
itself loses power. The invariant above holds in both modes for process crashes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Literal

from service.node.store.errors import StoreError, validate_uid

__all__ = ["DURABILITY_MODES", "Durability", "Spool", "check_durability"]

#: How much an acknowledged instance survives: see the module docstring.
Durability = Literal["power-loss", "process-crash"]
DURABILITY_MODES: tuple[Durability, ...] = ("power-loss", "process-crash")

_TEMP_SUFFIX = ".tmp"
_SLUG_PATTERN = re.compile(r"[^A-Za-z0-9_-]+")
_SLUG_MAX_LENGTH = 48


def check_durability(durability: object) -> Durability:
    """``durability`` when it is one of :data:`DURABILITY_MODES`, else a ValueError naming it."""
    if durability not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {', '.join(DURABILITY_MODES)}, got {durability!r}")
    return durability  # type: ignore[return-value]


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path, *, fsync: bool = True) -> None:
    """Create ``path`` and missing parents, fsyncing each parent that gained an entry (``fsync``)."""
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
        if fsync:
            _fsync_dir(folder.parent)


class Spool:
    """Durable files: temp file in the same folder, flush + os.fsync, os.replace to the final name, fsync the folder.

    Layout below ``root``: ``instances/<study>/<series>/<sop>.dcm`` (received instances),
    ``quarantine/<time>-<uuid>-<reason>.bin`` (raw bytes that could not be understood),
    ``outbox/<sop>.dcm`` (encoded outputs) and ``incoming/`` (data sets being received, in a
    receiver process). Every OSError becomes a :class:`StoreError` naming the path.
    """

    def __init__(self, root: Path, *, durability: Durability = "power-loss") -> None:
        self.root = Path(os.path.abspath(root))
        self.durability = check_durability(durability)
        self._fsync = durability == "power-loss"
        #: What a file written here gets (0666 less the umask), also given to a file moved in.
        self._file_mode = 0o666 & ~_umask()
        self.instances_dir = self.root / "instances"
        self.quarantine_dir = self.root / "quarantine"
        self.outbox_dir = self.root / "outbox"
        #: Where a receiver process has the listener write data sets as they arrive, so that
        #: keeping one is a rename: on the spool's filesystem.
        self.incoming_dir = self.root / "incoming"
        for folder in (self.instances_dir, self.quarantine_dir, self.outbox_dir, self.incoming_dir):
            try:
                _ensure_dir(folder)
            except OSError as exc:
                raise StoreError(f"cannot create spool folder {folder}: {exc}") from exc

    def write_instance(self, data: bytes | Path, *, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Store a received instance (its encoded bytes, or the file they were received into, which
        is moved); returns ``instances/<study>/<series>/<sop>.dcm``."""
        validate_uid(study_uid, "Study Instance UID")
        validate_uid(series_uid, "Series Instance UID")
        validate_uid(sop_uid, "SOP Instance UID")
        return self._write_atomic(self.instances_dir / study_uid / series_uid / f"{sop_uid}.dcm", data)

    def write_quarantine(self, data: bytes | Path, *, reason_slug: str) -> Path:
        """Keep raw bytes (or the file they were received into, moved) that could not be understood
        under a unique name (UTC time + uuid + slug)."""
        slug = _SLUG_PATTERN.sub("-", reason_slug).strip("-_")[:_SLUG_MAX_LENGTH] or "unknown"
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        return self._write_atomic(self.quarantine_dir / f"{stamp}-{uuid.uuid4().hex}-{slug}.bin", data)

    def write_output(self, data: bytes, *, sop_uid: str) -> Path:
        """Store an encoded output object; returns ``outbox/<sop>.dcm`` (replaced when rewritten)."""
        validate_uid(sop_uid, "SOP Instance UID")
        return self._write_atomic(self.outbox_dir / f"{sop_uid}.dcm", data)

    def remove_stale_temp_files(self, older_than_seconds: float = 0.0) -> int:
        """Delete temp files a killed process left behind (call at start-up, before receiving); returns how many.

        ``older_than_seconds``: only those last written that long ago (a spool shared with other
        machines, whose writers may be writing now)."""
        removed = 0
        cutoff = time.time() - older_than_seconds
        folders = (self.instances_dir, self.quarantine_dir, self.outbox_dir)
        temps = [temp for folder in folders for temp in folder.rglob(f".*{_TEMP_SUFFIX}")]
        incoming = [path for path in self.incoming_dir.iterdir() if path.is_file()]  # cut off mid-transfer
        for temp in [*temps, *incoming]:
            try:
                if older_than_seconds and temp.stat().st_mtime > cutoff:
                    continue
                temp.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"cannot remove stale temp file {temp}: {exc}") from exc
            removed += 1
        return removed

    def _write_atomic(self, final: Path, data: bytes | Path) -> Path:
        """Write ``data`` (bytes, or a file to move) to ``final`` so that ``final`` is either
        absent/old or complete, durably."""
        temp = final.with_name(f".{final.name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
        try:
            _ensure_dir(final.parent, fsync=self._fsync)
            if isinstance(data, Path):
                _move(data, temp)
                os.chmod(temp, self._file_mode)  # a temporary file is private (0600): as if written here
                if self._fsync:
                    with open(temp, "rb") as handle:
                        os.fsync(handle.fileno())
            else:
                with open(temp, "xb") as handle:
                    handle.write(data)
                    if self._fsync:
                        handle.flush()
                        os.fsync(handle.fileno())
            os.replace(temp, final)
            if self._fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                temp.unlink()
            raise StoreError(f"cannot write {final}: {exc}") from exc
        return final


def _umask() -> int:
    """The process's umask, from /proc (reading it with os.umask means setting it, for a moment,
    for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; across filesystems, copy it (in the kernel) and delete it."""
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(source, target)
        source.unlink()
