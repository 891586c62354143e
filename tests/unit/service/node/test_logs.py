"""Logging setup: plain lines or one JSON object per line on stderr, pynetdicom kept at warnings."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from service.node.logs import JsonFormatter, configure_logging


@pytest.fixture()
def restored_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers (pytest's among them): put everything back."""
    root, pynetdicom = logging.getLogger(), logging.getLogger("pynetdicom")
    handlers, level, pynetdicom_level = root.handlers[:], root.level, pynetdicom.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    pynetdicom.setLevel(pynetdicom_level)


def test_json_format_is_one_object_per_line_with_the_exception(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", json_format=True)
    log = logging.getLogger("service.node.test")
    log.info("stored instance %s of series %s", "1.2.3", "1.2.3.4")
    try:
        raise ValueError("bad tag\nsecond line")
    except ValueError:
        log.exception("could not store")
    log.debug("not at INFO")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "stored instance 1.2.3 of series 1.2.3.4"
    assert (first["level"], first["logger"], first["thread"]) == ("INFO", "service.node.test", "MainThread")
    assert first["time"].endswith("Z") and "exception" not in first
    assert second["level"] == "ERROR" and "ValueError: bad tag\nsecond line" in second["exception"]


def test_plain_format_and_pynetdicom_kept_at_warnings(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("DEBUG")
    logging.getLogger("service.node.test").debug("assembler woke")
    logging.getLogger("pynetdicom.acse").info("A-ASSOCIATE-RQ PDU with every dataset detail")
    err = capsys.readouterr().err
    assert " DEBUG service.node.test: assembler woke" in err
    assert "A-ASSOCIATE-RQ" not in err
    assert len(logging.getLogger().handlers) == 1, "earlier handlers are replaced, not added to"


def test_json_formatter_alone_formats_a_record() -> None:
    record = logging.LogRecord("service.node.http", logging.WARNING, __file__, 1, "port %d", (8080,), None)
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["message"], entry["level"], entry["logger"]) == ("port 8080", "WARNING", "service.node.http")
