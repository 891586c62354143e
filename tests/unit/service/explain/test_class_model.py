"""Class model visualisation: the optimised input is what the model calls the class; CLI to PNG + DICOM SC.

The demo model is fully convolutional with global average pooling, so the optimisation tests run
it on 64 x 64 inputs to stay fast; the CLI test runs it at the card's 224 x 224.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from PIL import Image
from pydicom.uid import SecondaryCaptureImageStorage

from service.cli.main import main
from service.explain.base import ExplainerError
from service.explain.methods.class_model import ClassModelVisualisation, class_logits
from service.inference.backends import OnnxRunner, load_runner
from service.inference.card import ModelCard
from service.models import demo_card_path
from service.models.demo.network import DemoNet
from tests.helpers import require_tool
from tests.unit.service.explain.explainer_checks import left_as_found

SHAPE = (1, 64, 64)
#: Few, large steps on a small image; jitter of one pixel (the demo's evidence is alignment-sensitive).
FAST = {"iterations": 40, "learning_rate": 0.1, "jitter": 1, "value_range": (-2.0, 2.0)}


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.load(demo_card_path())


@pytest.fixture(scope="module")
def demo_model(card: ModelCard) -> torch.nn.Module:
    return load_runner(card, "torch", device="cpu").torch_module


@pytest.mark.parametrize("objective", ["logit", "log_softmax"])
def test_class_model_is_classified_as_its_class(demo_model: torch.nn.Module, card: ModelCard, objective: str) -> None:
    target = card.output.classes.index("nodule")
    visualiser = ClassModelVisualisation(objective=objective, **FAST)
    start = class_logits(demo_model, visualiser.start_image(SHAPE))
    image = visualiser.generate(demo_model, target, SHAPE)
    final = class_logits(demo_model, image)
    assert image.shape == SHAPE and image.dtype == torch.float32
    assert float(image.min()) >= -2.0 and float(image.max()) <= 2.0  # clamped to the value range
    assert final[target] > start[target] + 3.0, (start, final)  # the noise start is not the nodule class
    assert int(final.argmax()) == target, final
    assert float(torch.softmax(final, 0)[target]) > 0.9, final


def test_same_seed_same_image_other_seed_other_image(demo_model: torch.nn.Module) -> None:
    settings = {**FAST, "iterations": 4}
    first = ClassModelVisualisation(seed=7, **settings).generate(demo_model, 1, SHAPE)
    again = ClassModelVisualisation(seed=7, **settings).generate(demo_model, 1, SHAPE)
    other = ClassModelVisualisation(seed=8, **settings).generate(demo_model, 1, SHAPE)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_model_left_as_found() -> None:
    torch.manual_seed(0)
    model = DemoNet()
    x = torch.randn(2, 1, 32, 32)
    with left_as_found(model, x, frozen=model.classifier.bias, eval_part=model.features.block1):
        image = ClassModelVisualisation(iterations=3, jitter=2).generate(model, 2, (1, 32, 32))
    assert torch.isfinite(image).all()


def test_torchscript_module_works_and_onnx_is_refused(card: ModelCard) -> None:
    scripted = load_runner(card, "torchscript", device="cpu").torch_module
    image = ClassModelVisualisation(iterations=2).generate(scripted, 0, (1, 32, 32))
    assert torch.isfinite(image).all() and image.shape == (1, 32, 32)
    onnx = OnnxRunner(str(card.weights_path("onnx")), device="cpu")
    with pytest.raises(ExplainerError, match="needs gradients"):
        ClassModelVisualisation(iterations=2).generate(onnx, 0, (1, 32, 32))


def test_progress_reports_every_n_steps_and_the_last(demo_model: torch.nn.Module) -> None:
    calls: list[tuple[int, float]] = []
    visualiser = ClassModelVisualisation(iterations=7, progress_every=3)
    visualiser.generate(demo_model, 0, (1, 32, 32), progress=lambda step, score: calls.append((step, score)))
    assert [step for step, _ in calls] == [3, 6, 7]
    assert all(math.isfinite(score) for _, score in calls)


def test_low_norm_pixels_are_clipped(demo_model: torch.nn.Module) -> None:
    image = ClassModelVisualisation(iterations=3, clip_percentile=50.0, blur_every=0).generate(
        demo_model, 1, (1, 32, 32)
    )
    assert float((image == 0).float().mean()) >= 0.45


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"iterations": 0}, "iterations must be a positive integer, got 0"),
        ({"learning_rate": -0.5}, "learning_rate must be a positive number, got -0.5"),
        ({"l2_weight": float("nan")}, "l2_weight must be a finite number, got nan"),
        ({"blur_every": -1}, "blur_every must be an integer >= 0, got -1"),
        ({"blur_sigma": 0}, "blur_sigma must be a positive number, got 0"),
        ({"jitter": 1.5}, "jitter must be an integer >= 0, got 1.5"),
        ({"seed": -3}, "seed must be an integer >= 0, got -3"),
        ({"noise_std": -0.1}, "noise_std must be >= 0, got -0.1"),
        ({"clip_percentile": 100}, r"clip_percentile must be in \[0, 100\), got 100"),
        ({"objective": "probability"}, "objective must be one of 'logit', 'log_softmax', got 'probability'"),
        ({"value_range": (1.0, 0.0)}, r"value_range must have low < high, got \(1.0, 0.0\)"),
        ({"progress_every": True}, "progress_every must be a positive integer, got True"),
    ],
)
def test_bad_settings_name_the_value(settings: dict, message: str) -> None:
    with pytest.raises(ExplainerError, match=message):
        ClassModelVisualisation(**settings)


@pytest.mark.parametrize(
    ("target", "shape", "message"),
    [
        (-1, (1, 32, 32), "target must be a class index >= 0, got -1"),
        (True, (1, 32, 32), "target must be a class index >= 0, got True"),
        (3, (1, 32, 32), r"targets \[3\] out of range for a model with 3 classes"),
        (0, (32, 32), r"input_shape must be \(channels, height, width\), got \(32, 32\)"),
        (0, (1, 0, 32), r"input_shape\[1\] must be a positive integer, got 0"),
    ],
)
def test_bad_target_or_shape_names_the_value(
    demo_model: torch.nn.Module, target: object, shape: tuple, message: str
) -> None:
    with pytest.raises(ExplainerError, match=message):
        ClassModelVisualisation(iterations=1).generate(demo_model, target, shape)  # type: ignore[arg-type]


# --- the command ------------------------------------------------------------------------------------


def test_cli_writes_png_and_a_valid_secondary_capture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["visualize-class", "--class", "nodule", "--out", str(out), "--iterations", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    png, dcm = out / "class-nodule.png", out / "class-nodule.dcm"
    assert str(png) in captured.out and str(dcm) in captured.out
    assert "noise start logit" in captured.out
    assert "step 4/4" in captured.err
    with Image.open(png) as picture:
        assert picture.mode == "L" and picture.size == (224, 224)
        pixels = np.asarray(picture)
    assert pixels.min() == 0 and pixels.max() == 255  # contrast-stretched
    sc = pydicom.dcmread(dcm)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.Modality == "OT" and sc.ConversionType == "WSD"
    assert list(sc.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert sc.SeriesDescription == "pacs-xai class model: nodule"
    assert np.array_equal(sc.pixel_array, pixels)
    run = subprocess.run([require_tool("dciodvfy"), str(dcm)], capture_output=True, text=True, timeout=120)
    report = run.stdout + run.stderr
    assert "SCImage" in report  # dciodvfy recognised the IOD
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


def test_cli_unknown_class_lists_the_valid_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["visualize-class", "--class", "pneumonia", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "'pneumonia'" in err and "normal, nodule, effusion" in err
    assert not list(tmp_path.iterdir())


def test_cli_onnx_only_card_needs_a_torch_runtime(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = demo_card_path()
    raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    raw["weights"] = {"onnx": raw["weights"]["onnx"]}
    raw.pop("auxiliary", None)  # the saliency masker, not copied: an ONNX-only card
    shutil.copy(source.parent / raw["weights"]["onnx"]["file"], tmp_path)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    code = main(["visualize-class", "--class", "nodule", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "torch or torchscript runtime" in err
