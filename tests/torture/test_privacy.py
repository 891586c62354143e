"""A privacy scan: a patient with a distinctive name, ID, birth date and accession number goes
through every path of a running ``pacs-xai serve`` (logging at DEBUG): a study explained and
delivered, an instance that fails in processing, one quarantined at reception, one whose patient
name has a lying VR. None of the values may appear in the node's log, its metrics (names, labels,
values), the reasons it journals, or the names of the files and folders it writes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicom_io.net.network import free_port
from dicom_io.net.scu import Destination, StoreSCU
from service.node.store import Journal
from service.synthetic.phantoms import make_phantom
from tests.helpers import wait_for
from tests.torture import report
from tests.torture.node import Destinations

PATIENT = {
    "PatientName": "ZEPHYRINE^QUAXLEY",
    "PatientID": "PXID7391QX",
    "PatientBirthDate": "19230917",
    "AccessionNumber": "ACCQX55821",
}
#: What is searched for: each value, and the pieces a formatter could cut it into.
NEEDLES = ("ZEPHYRINE", "QUAXLEY", "PXID7391QX", "7391QX", "19230917", "1923-09-17", "ACCQX55821", "QX55821")


def _patient_instance(index: int, study: str, series: str) -> pydicom.Dataset:
    ds = make_phantom(index, "nodule", seed=5, rows=256, cols=240, study_uid=study, series_uid=series).dataset
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    return ds


def _encode(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_patient_data_never_leaves_the_dicom_objects(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "in"
    folder.mkdir()
    good = _patient_instance(0, study, series)
    short = _patient_instance(1, study, series)
    short.PixelData = short.PixelData[:1000]  # fails in processing, with a reason
    no_uid = _patient_instance(2, study, series)
    del no_uid.SeriesInstanceUID  # quarantined at reception
    lying = bytearray(_encode(_patient_instance(3, study, series)))
    at = lying.index(b"\x10\x00\x10\x00PN")  # (0010,0010) Patient's Name, explicit VR
    lying[at + 4 : at + 6] = b"UL"  # a lying VR over the name's bytes
    files = []
    for name, data in (("good", _encode(good)), ("short", _encode(short)), ("nouid", _encode(no_uid)),
                       ("lying", bytes(lying))):  # fmt: skip
        path = folder / f"{name}.dcm"
        path.write_bytes(data)
        files.append(path)

    destination = Destinations(tmp_path / "dest")
    port, metrics_port, data_dir, log = free_port(), free_port(), tmp_path / "node", tmp_path / "node.log"
    env = {**os.environ, "PACS_XAI_LOGGING__LEVEL": "DEBUG", "PACS_XAI_ASSEMBLY__IDLE_SECONDS": "0.3",
           "PACS_XAI_METRICS__PORT": str(metrics_port), "PACS_XAI_MODEL__WARM_UP": "false"}  # fmt: skip
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
               "--destination", f"DEST@127.0.0.1:{destination.port}", "--method", "gradcam",
               "--outputs", "sc,pm"]  # fmt: skip
    node = subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: StoreSCU("PROBE").echo(Destination("PACSXAI", "127.0.0.1", port)), 90, "the node")
        outcomes = StoreSCU("MODALITY").send(Destination("PACSXAI", "127.0.0.1", port), files)
        verdicts = [o.verdict for o in outcomes]
        assert verdicts.count("delivered") == 3 and verdicts.count("reject") == 1, [o.detail for o in outcomes]

        def settled() -> bool:
            journal = Journal(data_dir / "journal.sqlite")
            try:
                counts = journal.counts()
            finally:
                journal.close()
            processed = counts["instances_done"] + counts["instances_failed"] + counts["instances_skipped"]
            return processed == 3 and counts.get("outbox_pending", 0) == 0

        wait_for(settled, 120, "three instances processed and their results sent")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        health = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=10).read().decode()
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=60) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=30)
        destination.stop()

    delivered = [pydicom.dcmread(p) for p in destination.folder.iterdir()]
    assert delivered and all(str(ds.PatientName) == PATIENT["PatientName"] for ds in delivered), (
        "the results must carry the patient (the scan below must be able to fail)"
    )
    journal = Journal(data_dir / "journal.sqlite")
    try:
        with journal._connection.transaction(write=False) as db:
            reasons = [str(r[0]) for r in db.execute("SELECT reason FROM instances")]
            reasons += [str(r[0]) for r in db.execute("SELECT reason FROM quarantine")]
            reasons += [str(r[0] or "") for r in db.execute("SELECT last_error FROM outbox")]
    finally:
        journal.close()
    assert any(reasons), "no failure reason was journaled: the failure paths were not taken"
    log_text = log.read_text(errors="replace")
    assert " DEBUG " in log_text or '"DEBUG"' in log_text, "the scan must read a DEBUG log"
    names = [str(p.relative_to(data_dir)) for p in data_dir.rglob("*")]
    places = {"log": log_text, "metrics": metrics, "readiness": health, "journal reasons": "\n".join(reasons),
              "file and folder names": "\n".join(names)}  # fmt: skip
    leaks = {place: [n for n in NEEDLES if n.lower() in text.lower()] for place, text in places.items()}
    assert not any(leaks.values()), f"patient data found: {leaks}"
    report.record(
        report.Finding(
            "security",
            "privacy scan: distinctive patient name, ID, birth date, accession through success, processing "
            "failure, quarantine and a lying VR over the name (DEBUG log)",
            "none of them in logs (all levels), metrics, readiness, journaled reasons, file or folder names",
            len(files),
            {"places scanned": len(places), "values found": 0},
            f"{len(log_text.splitlines())} log lines, {len(metrics.splitlines())} metrics lines, "
            f"{len(reasons)} journaled reasons, {len(names)} paths scanned",
        )
    )
