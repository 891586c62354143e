"""UIDs are checked before they become part of a path or a row: InvalidUIDError, a StoreError."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.node.store.errors import InvalidUIDError, StoreError, validate_uid
from service.node.store.journal import Journal, ReceivedInstance
from service.node.store.spool import Spool
from tests.unit.service.node.helpers import CT_IMAGE_STORAGE, ROOT_UID, SERIES, STUDY


@pytest.mark.parametrize("bad", ["1.2/../../etc", "..", "1.2.", "", "1..2", "1.2.abc", "/etc/passwd", "1" * 65])
def test_uids_that_could_escape_the_spool_are_refused(tmp_path: Path, journal: Journal, bad: str) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUIDError, match=repr(bad).replace(".", r"\.")) as error:
        spool.write_instance(b"x", study_uid=STUDY, series_uid=SERIES, sop_uid=bad)
    assert isinstance(error.value, StoreError)
    with pytest.raises(StoreError):
        spool.write_instance(b"x", study_uid=bad, series_uid=SERIES, sop_uid=f"{ROOT_UID}.3.1")
    with pytest.raises(StoreError):
        spool.write_output(b"x", sop_uid=bad)
    with pytest.raises(StoreError):
        journal.record_received(ReceivedInstance(bad, CT_IMAGE_STORAGE, STUDY, SERIES, Path("x"), "AE", "a", 0.0))
    assert list(tmp_path.rglob("*.dcm")) == []
    assert not (tmp_path.parent / "etc").exists()


def test_valid_uids_pass() -> None:
    assert validate_uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    assert validate_uid("0") == "0"
