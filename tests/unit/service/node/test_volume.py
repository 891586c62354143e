"""The volume pipeline with the shipped demo volume model: a phantom CT series is explained as one
volume (the prediction right, the map on the nodule, the outputs one frame per slice); a broken series
is skipped whole with its reason and logged with UIDs only; methods that cannot take volumes, output
kinds it does not have and 2D cards are refused when the pipeline is built."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service.cli.main import main
from service.inference.deployed import DeployedModel
from service.models import demo_card_path, volume_card_path
from service.node.pipeline import ExplainPipeline, PipelineConfigError
from service.node.volume import VolumePipeline, volume_methods
from service.synthetic.volumes import make_ct_phantom, write_ct_series
from tests.helpers import HELD_OUT_SEED

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model() -> Iterator[DeployedModel]:
    deployed = DeployedModel.from_card_path(volume_card_path())
    yield deployed
    deployed.close()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    phantom = make_ct_phantom(3, "nodule", seed=HELD_OUT_SEED)
    folder = tmp_path_factory.mktemp("ct") / "nodule"
    write_ct_series(folder, phantom)
    return folder, phantom


def _read(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]


def test_a_series_is_explained_as_one_volume(model: DeployedModel, series) -> None:
    folder, phantom = series
    pipeline = VolumePipeline(model, ["gradcam", "occlusion"], ["pm", "seg_fractional", "sc"], key_slices=2)
    datasets = _read(folder)
    result = pipeline.process(datasets)
    assert result.skipped_reason is None
    assert result.prediction is not None and result.prediction.class_name == "nodule"
    kinds = sorted((output.method, output.kind) for output in result.outputs)
    assert kinds == sorted([(m, k) for m in ("gradcam", "occlusion") for k in ("pm", "seg_fractional", "sc", "sc")])
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for output in result.outputs:
        if output.kind != "pm":
            continue
        pm = output.dataset
        assert int(pm.NumberOfFrames) == len(datasets)
        # the map, read back from the PM's own frames into the phantom's slice order, is on the nodule
        values = np.zeros(phantom.hu.shape, dtype=np.float64)
        for frame, item in enumerate(pm.PerFrameFunctionalGroupsSequence):
            source = by_uid[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
            values[phantom.hu.shape[0] - int(source.InstanceNumber)] = pm.pixel_array[frame]  # numbered head first
        peak = np.unravel_index(int(values.argmax()), values.shape)
        if output.method == "gradcam":  # fine map: its peak within one voxel of the nodule
            window = tuple(slice(max(p - 1, 0), p + 2) for p in peak)
            assert phantom.lesion_mask[window].any(), peak
        inside = float(values[phantom.lesion_mask].mean())
        outside = float(np.abs(values[~phantom.lesion_mask]).mean())
        assert inside > 5 * outside, (output.method, inside, outside)


def test_a_broken_series_is_skipped_whole_and_logged_with_uids_only(model: DeployedModel, series, caplog) -> None:
    folder, _ = series
    datasets = _read(folder)
    del datasets[10]
    pipeline = VolumePipeline(model, ["gradcam"], ["pm"])
    with caplog.at_level(logging.WARNING, logger="service.node.volume"):
        result = pipeline.process(datasets)
    assert result.skip_code == "gap" and "gap between slices" in (result.skipped_reason or "")
    assert result.outputs == [] and result.prediction is None
    assert datasets[0].SeriesInstanceUID in caplog.text
    assert str(datasets[0].PatientName) not in caplog.text and str(datasets[0].PatientID) not in caplog.text


def test_a_series_outside_the_card_is_skipped_unless_forced(model: DeployedModel, series) -> None:
    folder, _ = series
    datasets = _read(folder)
    for ds in datasets:
        ds.BodyPartExamined = "HEAD"
    assert VolumePipeline(model, ["gradcam"]).process(datasets).skip_code == "not_applicable"
    assert VolumePipeline(model, ["gradcam"], enforce_applies_to=False).process(datasets).skipped_reason is None


def test_what_cannot_run_on_volumes_is_refused_when_built(model: DeployedModel) -> None:
    with pytest.raises(PipelineConfigError, match="lime, extremal_perturbation cannot explain volumes"):
        VolumePipeline(model, ["gradcam", "lime", "extremal_perturbation"])
    assert "gradcam" in volume_methods() and "lime" not in volume_methods()
    with pytest.raises(PipelineConfigError, match="unknown volume output kind"):
        VolumePipeline(model, ["gradcam"], ["sr"])
    with pytest.raises(PipelineConfigError, match="takes whole series"):
        ExplainPipeline(model, ["gradcam"])
    image_model = DeployedModel.from_card_path(demo_card_path())
    try:
        with pytest.raises(PipelineConfigError, match="needs a volume model"):
            VolumePipeline(image_model, ["gradcam"])
    finally:
        image_model.close()


def test_explain_command_on_series_folders(series, tmp_path: Path, capsys) -> None:
    folder, _ = series
    gapped = tmp_path / "gapped"
    write_ct_series(gapped, make_ct_phantom(4, "normal", seed=HELD_OUT_SEED))
    sorted(gapped.glob("*.dcm"))[7].unlink()
    out = tmp_path / "out"
    code = main(["explain", str(folder), str(gapped), "--model", str(volume_card_path()), "--out", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "skipped" in table and "gap between slices" in table
    assert any("nodule" in line and "gradcam" in line for line in table.splitlines())
    names = sorted(path.name.split("_", 1)[1] for path in out.glob("*.dcm"))
    assert names == ["gradcam_pm.dcm", "gradcam_seg_fractional.dcm"]


def test_warm_up_explains_a_synthetic_series_with_every_method_and_keeps_nothing(model: DeployedModel) -> None:
    pipeline = VolumePipeline(model, ["gradcam"], ["pm", "sc"])
    seconds = pipeline.warm_up()
    assert 0 < seconds < 60
    assert pipeline.enforce_applies_to, "the card's applies_to still holds for real series"
