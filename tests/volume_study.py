"""A phantom chest CT series explained in 3D by ``pacs-xai explain``, as the PACS tests need it.

The series (48 axial slices, the demo volume model's phantom with a nodule) and what the command
writes for it with the shipped volume card: the multi-frame Parametric Map, the binary and the
fractional Segmentation, and Secondary Captures of the key slices. :func:`send_to` stores them
all in a PACS by C-STORE the way the node does (the StoreSCU, results deflated on the wire).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_io.net.scu import Destination, SendOutcome, StoreSCU
from service.cli.main import main
from service.models import volume_card_path
from service.synthetic.volumes import CtPhantom, make_ct_phantom, write_ct_series
from tests.helpers import HELD_OUT_SEED

#: SOP Class UID -> output kind (a Segmentation is told apart by its Segmentation Type).
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
OUTPUTS = "pm,seg_binary,seg_fractional,sc"
KEY_SLICES = 3


@dataclass(frozen=True)
class VolumeStudy:
    """The phantom, its CT slice files and the explain command's files by kind (source, pm, seg_binary, ...)."""

    phantom: CtPhantom
    files: dict[str, list[Path]]

    @property
    def study_uid(self) -> str:
        return str(pydicom.dcmread(self.files["source"][0], stop_before_pixels=True).StudyInstanceUID)

    def read(self, kind: str) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(path) for path in self.files[kind]]

    def series_uid(self, kind: str) -> str:
        return str(pydicom.dcmread(self.files[kind][0], stop_before_pixels=True).SeriesInstanceUID)


def output_kind(ds: pydicom.Dataset) -> str:
    sop = str(ds.SOPClassUID)
    if sop == SEGMENTATION:
        return "seg_" + str(ds.SegmentationType).lower()
    return {PARAMETRIC_MAP: "pm", SECONDARY_CAPTURE: "sc", CT_IMAGE: "source"}.get(sop, sop)


def explain_ct_phantom(folder: Path, *, index: int = 3) -> VolumeStudy:
    """Write the nodule phantom ``index`` as a CT series and run ``pacs-xai explain`` on it
    (demo volume card, Grad-CAM, every volume output, ``--key-slices 3``)."""
    phantom = make_ct_phantom(index, "nodule", seed=HELD_OUT_SEED)
    source = write_ct_series(folder / "ct", phantom)
    out = folder / "explained"
    code = main(
        ["explain", str(folder / "ct"), "--model", str(volume_card_path()), "--method", "gradcam"]
        + ["--outputs", OUTPUTS, "--key-slices", str(KEY_SLICES), "--out", str(out)]
    )
    assert code == 0, f"pacs-xai explain exited with {code}"
    files: dict[str, list[Path]] = defaultdict(list)
    files["source"] = sorted(source)
    for path in sorted(out.glob("*.dcm")):
        files[output_kind(pydicom.dcmread(path, stop_before_pixels=True))].append(path)
    return VolumeStudy(phantom, dict(files))


def send_to(study: VolumeStudy, ae_title: str, port: int) -> list[SendOutcome]:
    """C-STORE the CT slices (as they are) and the results (deflated, the node's default) to a PACS."""
    scu = StoreSCU("PACSXAI")
    outcomes = scu.send(Destination(ae_title, "127.0.0.1", port), study.files["source"])
    results = [path for kind, paths in study.files.items() if kind != "source" for path in paths]
    deflated = Destination(ae_title, "127.0.0.1", port, transfer_syntaxes=(DeflatedExplicitVRLittleEndian,))
    return outcomes + scu.send(deflated, results)
