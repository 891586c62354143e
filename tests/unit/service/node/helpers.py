"""What the node's unit tests share: UIDs, a clock under the test's control, journal rows, metric samples."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.node.metrics import NodeMetrics
from service.node.store import Journal, ReceivedInstance

ROOT_UID = "1.2.826.0.1.3680043.10.999"
STUDY = f"{ROOT_UID}.1"
SERIES = f"{ROOT_UID}.2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class FakeClock:
    """Seconds (Unix or monotonic, as the code under test reads them) under the test's control."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def received_instance(
    n: int, path: Path | None = None, *, association: str = "assoc-1", at: float | None = None
) -> ReceivedInstance:
    """Instance number ``n`` of the test series, as the receiver journals it (received at ``n`` by default)."""
    return ReceivedInstance(
        sop_instance_uid=f"{ROOT_UID}.3.{n}",
        sop_class_uid=CT_IMAGE_STORAGE,
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        path=path or Path(f"/spool/{n}.dcm"),
        calling_ae="MODALITY",
        association_id=association,
        received_at=float(n) if at is None else at,
    )


def add_output(journal: Journal, n: int, destination: str = "PACS", path: Path | None = None) -> str:
    """Queue output number ``n`` (derived from instance ``n``) for ``destination``; returns its SOP Instance UID."""
    uid = f"{ROOT_UID}.9.{n}"
    journal.outbox.add(
        sop_instance_uid=uid,
        source_sop_instance_uid=f"{ROOT_UID}.3.{n}",
        destination=destination,
        path=path or Path(f"/spool/outbox/{uid}.dcm"),
        kind="sc",
        method="gradcam",
    )
    return uid


def temp_files(root: Path) -> list[Path]:
    """The spool's temp files (``.*.tmp``) anywhere below ``root``."""
    return [path for path in root.rglob("*") if path.name.endswith(".tmp")]


def sample(metrics: NodeMetrics, name: str, **labels: str) -> float:
    """The value of one sample in the node's registry; 0.0 when that label set was never used."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def non_image_dataset(
    sop_class_uid: str, modality: str, *, study_uid: str | None = None, series_uid: str | None = None
) -> Dataset:
    """A minimal object without pixels as a PACS sends it with a study (an SR, a presentation state,
    a PDF...): the UIDs and Modality, File Meta included, no Rows, no Pixel Data."""
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
