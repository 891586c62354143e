"""The connection guard's pieces that need no socket: per-host slots, the calling AE of a refused
request, the per-association copy of the presentation contexts. (The guard on the wire is
exercised by tests/torture/test_wire.py against a running node.)"""

from __future__ import annotations

import threading
from copy import deepcopy

import pytest

from dicom_io.net.guard import ConnectionGate, _copy_contexts, calling_ae_title
from dicom_io.net.scp import ListenerSettings, _build_ae


def test_gate_bounds_each_host_and_frees_a_slot_once() -> None:
    gate = ConnectionGate(2)
    first, second = gate.admit("10.0.0.1"), gate.admit("10.0.0.1")
    assert first is not None and second is not None
    assert gate.admit("10.0.0.1") is None
    assert gate.admit("10.0.0.2") is not None  # another host is not affected
    first.release()
    first.release()  # idempotent: a second release must not free a slot it does not hold
    assert gate.live("10.0.0.1") == 1
    assert gate.admit("10.0.0.1") is not None
    assert gate.admit("10.0.0.1") is None
    assert gate.live() == 3


def test_gate_counts_right_under_concurrent_admits() -> None:
    gate = ConnectionGate(50)
    admitted = []

    def grab() -> None:
        for _ in range(40):
            slot = gate.admit("h")
            if slot is not None:
                admitted.append(slot)

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 50 == gate.live("h")
    for slot in admitted:
        slot.release()
    assert gate.live() == 0


def test_gate_refuses_a_limit_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1, got 0"):
        ConnectionGate(0)


def test_calling_ae_title_of_a_request_and_of_garbage() -> None:
    request = bytes([0x01, 0, 0, 0, 0, 100, 0, 1, 0, 0]) + b"PACSXAI".ljust(16) + b"CT_SCANNER".ljust(16)
    assert calling_ae_title(request) == "CT_SCANNER"
    assert calling_ae_title(b"\x04" + request[1:]) == ""  # not an A-ASSOCIATE-RQ
    assert calling_ae_title(request[:30]) == ""  # cut before the calling AE


def test_context_copies_equal_pynetdicoms_deepcopy_and_are_independent() -> None:
    contexts = _build_ae(ListenerSettings(port=0)).supported_contexts
    copies, reference = _copy_contexts(contexts), deepcopy(contexts)
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role) for c in copies] == [
        (c.context_id, c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role) for c in reference
    ]
    copies[0].transfer_syntax.clear()
    copies[0].context_id = 99
    assert contexts[0].transfer_syntax and contexts[0].context_id != 99
