"""``pacs-xai explain`` end to end: real files in, valid Secondary Captures out, bad files reported."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from highdicom.sr.utils import find_content_items
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from service.cli.main import build_parser, main
from service.synthetic.phantoms import write_phantom_studies
from tests.nets import TinyMultiLabel, seeded, write_card
from tests.unit.dicom_io.writers.writer_cases import dciodvfy


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_studies(folder, studies=3, seed=5)
    return folder


def test_explain_folder_with_both_methods_writes_valid_objects(phantom_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(
        ["explain", str(phantom_dir), "--method", "gradcam", "--method", "occlusion", "--out", str(out), "--png"]
    )
    assert code == 0
    table = capsys.readouterr().out
    written = sorted(out.glob("*.dcm"))
    assert len(written) == 3 * 2, [p.name for p in written]
    assert len(list(out.glob("*.png"))) == 6
    for path in written:
        sc = pydicom.dcmread(path)
        source = pydicom.dcmread(phantom_dir / (path.name.split("_")[0] + ".dcm"))
        assert sc.StudyInstanceUID == source.StudyInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sc.Rows == source.Rows
        assert sc.pixel_array.shape[-1] == 3
    for method in ("gradcam", "occlusion"):
        assert method in table
    # The phantoms' classes are in the file names; the demo model should get them right.
    for path in phantom_dir.glob("*.dcm"):
        truth = path.stem.split("-")[2]
        line = next(line for line in table.splitlines() if line.startswith(path.name))
        assert line.split()[2] == truth, line


def test_one_bad_file_is_reported_and_the_others_finish(phantom_dir: Path, tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(phantom_dir, inputs)
    (inputs / "notes.txt").write_text("this is not DICOM")
    truncated = inputs / "truncated.dcm"
    data = next(phantom_dir.glob("*.dcm")).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code = main(["explain", str(inputs), "--method", "gradcam", "--out", str(out)])
    assert code == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, captured.err
    assert any("notes.txt" in line for line in errors) and any("truncated.dcm" in line for line in errors)
    assert len(list(out.glob("*.dcm"))) == 3


def test_images_outside_the_card_are_skipped_unless_forced(tmp_path: Path, capsys) -> None:
    ct = get_testdata_file("CT_small.dcm")
    code = main(["explain", ct, "--method", "occlusion", "--out", str(tmp_path / "a")])
    assert code == 0
    assert "skipped" in capsys.readouterr().out and not list((tmp_path / "a").glob("*.dcm"))
    code = main(["explain", ct, "--method", "occlusion", "--force", "--out", str(tmp_path / "b")])
    assert code == 0 and len(list((tmp_path / "b").glob("*.dcm"))) == 1


def test_unknown_method_is_a_usage_error_listing_the_methods(tmp_path: Path, capsys) -> None:
    code = main(["explain", str(tmp_path), "--method", "magic", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "magic" in err and "gradcam" in err


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser tree: (), ("demo",), ("demo", "run"), ..."""
    paths = [prefix]
    for action in parser._actions:  # argparse has no public walk over its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


def test_every_command_has_help_with_an_example(capsys) -> None:
    paths = _command_paths(build_parser())
    assert ("bench", "throughput") in paths and ("demo", "train-saliency") in paths  # the walk found the leaves
    for path in paths:
        with pytest.raises(SystemExit) as exited:
            main([*path, "--help"])
        assert exited.value.code == 0, path
        assert "example" in capsys.readouterr().out, path
    result = subprocess.run([sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, check=True)
    assert "example" in result.stdout  # and the module runs as a program


def test_sc_overlay_shows_the_map_where_gradcam_points(phantom_dir: Path, tmp_path: Path) -> None:
    """The written SC is not blank: colour appears in the image and the anatomy stays visible."""
    nodule = next(phantom_dir.glob("*nodule*.dcm"))
    main(["explain", str(nodule), "--method", "gradcam", "--out", str(tmp_path)])
    rgb = pydicom.dcmread(next(tmp_path.glob("*.dcm"))).pixel_array.astype(int)
    colourful = (np.abs(rgb[..., 0] - rgb[..., 2]) > 40).mean()
    gray = (np.abs(rgb[..., 0] - rgb[..., 2]) < 2).mean()
    assert 0.001 < colourful < 0.6, f"heatmap share {colourful:.3f}"
    assert gray > 0.3, f"grayscale anatomy share {gray:.3f}"


def test_every_output_kind_is_written_and_the_report_references_the_others(phantom_dir: Path, tmp_path: Path) -> None:
    nodule = next(phantom_dir.glob("*nodule*.dcm"))
    code = main(
        [
            "explain",
            str(nodule),
            "--method",
            "gradcam",
            "--outputs",
            "sc,pm,seg_fractional,seg_binary,sr",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    objects = {path.stem.split("_", 2)[2]: pydicom.dcmread(path) for path in tmp_path.glob("*.dcm")}
    assert set(objects) == {"sc", "pm", "seg_fractional", "seg_binary", "sr"}
    source = pydicom.dcmread(nodule)
    assert len({ds.StudyInstanceUID for ds in objects.values()} | {source.StudyInstanceUID}) == 1
    assert len({ds.SeriesInstanceUID for ds in objects.values()}) == 5
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in objects["sr"].CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    expected = {source.SOPInstanceUID} | {ds.SOPInstanceUID for kind, ds in objects.items() if kind != "sr"}
    assert evidence == expected


def test_the_table_names_the_trust_flags(tmp_path: Path, capsys) -> None:
    """A CT forced through the chest model: its row says "out of distribution"; a phantom's says nothing."""
    inputs = tmp_path / "in"
    write_phantom_studies(inputs, studies=1, seed=5)
    shutil.copy(get_testdata_file("CT_small.dcm"), inputs / "ct.dcm")
    assert main(["explain", str(inputs), "--force", "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "flags"
    ct = next(line for line in lines if line.startswith("ct.dcm"))
    phantom = next(line for line in lines if line.startswith("phantom-"))
    assert ct.endswith("out of distribution") and "distribution" not in phantom and "shortcut" not in phantom


# --- a multi-label model end to end: every explained finding its own objects, all valid DICOM --------------


def _check_multi_label_outputs(out: Path, source: pydicom.Dataset, findings: list[str], classes: list[str]) -> None:
    """Per finding an SC and a PM whose series names it; one SEG with a segment per finding; one SR
    with every class; every object valid per dciodvfy and in the source's study."""
    stem = Path(source.filename).stem
    for finding in findings:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", finding).strip("-")
        for kind, description in (("sc", f"XAI gradcam {finding}"), ("pm", f"XAI gradcam {finding} map")):
            written = pydicom.dcmread(out / f"{stem}_gradcam_{kind}_{slug}.dcm")
            assert written.SeriesDescription == description[:64]
    seg = pydicom.dcmread(out / f"{stem}_gradcam_seg_fractional.dcm")
    assert [item.SegmentLabel for item in seg.SegmentSequence] == [f"gradcam {f}"[:64] for f in findings]
    report = hd.sr.srread(out / f"{stem}_gradcam_sr.dcm")
    groups = hd.sr.MeasurementReport.from_sequence([report]).get_image_measurement_groups()
    assert [g.tracking_identifier.split(" ", 1)[1] for g in groups] == classes
    paths = sorted(out.glob("*.dcm"))
    assert len(paths) == 2 * len(findings) + 2
    for path in paths:
        assert pydicom.dcmread(path).StudyInstanceUID == source.StudyInstanceUID
        _, errors = dciodvfy(path)
        assert not errors, f"{path.name}: " + "\n".join(errors)


def test_a_multi_label_card_explains_each_finding_into_its_own_valid_objects(
    phantom_dir: Path, tmp_path: Path, capsys
) -> None:
    card = write_card(
        tmp_path / "card",
        seeded(TinyMultiLabel(4), seed=3),
        "tests.nets:TinyMultiLabel",
        explain={"findings": "top_k", "top_k": 2},
    )
    source_path = sorted(phantom_dir.glob("*.dcm"))[0]
    out = tmp_path / "out"
    code = main(
        ["explain", str(source_path), "--model", str(card), "--method", "gradcam", "--force", "--out", str(out),
         "--outputs", "sc,pm,seg_fractional,sr"]
    )  # fmt: skip
    assert code == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(source_path.name))
    findings = re.split(r"\s{2,}", line)[2].split(", ")  # the table's explained findings, most probable first
    assert len(findings) == 2 and set(findings) <= set("abcd"), line
    _check_multi_label_outputs(out, pydicom.dcmread(source_path), findings, list("abcd"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchxrayvision") is None, reason="torchxrayvision not installed")
def test_a_torchxrayvision_card_from_model_init_through_explain(phantom_dir: Path, tmp_path: Path, capsys) -> None:
    """model init --torchxrayvision DenseNet (random weights), then explain: 18 pathologies in the SR,
    the two most probable explained."""
    card = tmp_path / "xrv"
    init = ["model", "init", str(card), "--torchxrayvision", "DenseNet", "--findings", "top_k", "--top-k", "2"]
    assert main(init) == 0
    capsys.readouterr()
    source_path = sorted(phantom_dir.glob("*.dcm"))[0]
    out = tmp_path / "out"
    code = main(
        ["explain", str(source_path), "--model", str(card), "--force", "--out", str(out),
         "--outputs", "sc,pm,seg_fractional,sr"]
    )  # fmt: skip
    assert code == 0
    classes = list(yaml.safe_load((card / "model.yaml").read_text())["output"]["classes"])
    assert len(classes) == 18
    report = hd.sr.srread(out / f"{source_path.stem}_gradcam_sr.dcm")
    groups = hd.sr.MeasurementReport.from_sequence([report]).get_image_measurement_groups()
    illustrated = [
        g.tracking_identifier.split(" ", 1)[1]
        for g in groups
        if find_content_items(g[0], name=codes.DCM.IllustrationOfFinding)
    ]
    seg = pydicom.dcmread(out / f"{source_path.stem}_gradcam_seg_fractional.dcm")
    findings = [item.SegmentLabel.split(" ", 1)[1] for item in seg.SegmentSequence]
    assert len(findings) == 2 and set(findings) == set(illustrated) and set(findings) <= set(classes)
    _check_multi_label_outputs(out, pydicom.dcmread(source_path), findings, classes)
