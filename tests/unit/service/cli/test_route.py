"""``pacs-xai route FILE...``: the rule each file would take and, for every other rule, why not."""

from __future__ import annotations

from pathlib import Path

import pydicom
import yaml

from service.cli.main import main
from service.synthetic.phantoms import make_phantom
from tests.helpers import data_file
from tests.unit.service.node.helpers import non_image_dataset


def _files(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    paths = {}
    series = pydicom.uid.generate_uid()
    for index in range(2):  # two radiographs of one series
        ds = make_phantom(index, "nodule", rows=256, cols=128, series_uid=series).dataset
        paths[f"cr{index}"] = folder / f"cr{index}.dcm"
        ds.save_as(paths[f"cr{index}"], enforce_file_format=True)
    paths["ct"] = folder / "ct.dcm"
    pydicom.dcmread(data_file("CT_small.dcm")).save_as(paths["ct"])
    paths["sr"] = folder / "sr.dcm"
    non_image_dataset("1.2.840.10008.5.1.4.1.1.88.11", "SR").save_as(paths["sr"], enforce_file_format=True)
    return paths


def test_route_prints_the_rule_each_file_takes_and_the_first_mismatch_of_the_others(tmp_path: Path, capsys) -> None:
    files = _files(tmp_path / "in")
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "routes": [
                    {"name": "from-orthanc", "match": {"calling_ae_title": "ORTHANC"}, "continue": True},
                    {"name": "ct-volume", "match": {"modality": "CT", "instances": {"min": 20}}},
                    {"name": "chest", "match": {"modality": "CR|DX", "instances": {"min": 2}, "columns": {"max": 200}}},
                    {"name": "anything"},
                ]
            }
        )
    )

    assert main(["route", str(tmp_path / "in"), "--config", str(config), "--calling-ae", "ORTHANC"]) == 0

    out = capsys.readouterr().out
    blocks: dict[str, list[str]] = {}
    for line in out.splitlines():
        if not line.startswith("  ") and ": SOP Instance " in line:
            current = line.split(":", 1)[0]
            blocks[current] = [line]
        elif line.startswith("  "):
            blocks[current].append(line.strip())
    cr = pydicom.dcmread(files["cr0"], stop_before_pixels=True)
    assert blocks["cr0.dcm"] == [
        f"cr0.dcm: SOP Instance {cr.SOPInstanceUID} (CR, series {cr.SeriesInstanceUID}, 2 instance(s) given) "
        "-> from-orthanc, chest",
        "from-orthanc: taken",
        "ct-volume: Modality 'CR' does not match 'CT'",
        "chest: taken",
        "anything: not reached (an earlier rule took it; no continue)",
    ]
    assert blocks["ct.dcm"][0].endswith(
        "(CT, series 1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322, 1 instance(s) given) -> from-orthanc, anything"
    )
    assert blocks["ct.dcm"][2:4] == [
        "ct-volume: instances in the series 1 is not >= 20",
        "chest: Modality 'CT' does not match 'CR|DX'",
    ]
    assert blocks["sr.dcm"][0].endswith("-> not routed (the node would not keep it)")
    assert "4 file(s) read, 0 unreadable" in out
    for patient in (cr.PatientName, cr.PatientID, "CompressedSamples"):  # CT_small's patient name
        assert str(patient) not in out


def test_route_without_a_config_applies_the_default_rule_and_an_unreadable_file_fails(tmp_path: Path, capsys) -> None:
    files = _files(tmp_path / "in")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM at all")

    assert main(["route", str(files["ct"]), str(files["cr0"]), str(broken)]) == 1

    captured = capsys.readouterr()
    assert (
        "ct.dcm: SOP Instance" in captured.out
        and "default: Modality 'CT' does not match any of ['CR', 'DX']" in captured.out
    )
    assert "-> default" in captured.out
    assert "broken.dcm" in captured.err and "2 file(s) read, 1 unreadable" in captured.out
