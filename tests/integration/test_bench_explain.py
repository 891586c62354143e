"""``pacs-xai bench explain`` on a tiny setting: the record's fields, forward rows that follow from
the method's definition, and the DenseNet-121-sized model's size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from service.explain.base import ExplainerError
from service.explain.methods.windows import window_masks
from service.tools.bench.densenet import densenet121, parameter_count
from service.tools.bench.explain import NODE_ON_MODULE, check_request, parse_param, run_explain_bench

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]

WINDOW, STRIDE = 48, 32


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench-explain")
    messages: list[str] = []
    run_explain_bench(
        ["gradcam", "occlusion"],
        ["demo"],
        1,
        out,
        messages.append,
        repeats=1,
        min_timed_s=0.0,
        device="cpu",
        params={"occlusion": {"window": WINDOW, "stride": STRIDE}},
    )
    assert any("[2/2] demo: occlusion" in m for m in messages), messages
    return json.loads((out / "explain.json").read_text()), out


def test_record_fields(figures: tuple[dict, Path]) -> None:
    data, out = figures
    assert (out / "explain.png").stat().st_size > 0
    assert data["device"].startswith("cpu")
    assert data["models"]["demo"]["forward_s_per_sample"] > 0
    assert data["models"]["demo"]["gradient_s_per_sample"] > 0
    records = {record["method"]: record for record in data["results"]}
    assert set(records) == {"gradcam", "occlusion"}
    for record in records.values():
        assert record["status"] == "ok", record["status"]
        assert record["model"] == "demo"
        assert record["time_s_per_image"] > 0 and len(record["times_s"]) >= 1
        assert record["peak_mb"] is not None and record["peak_mb"] >= 0
        assert math.isfinite(record["floor_ratio"]) and record["floor_ratio"] > 0
        assert record["peers"], f"{record['method']} has Captum as a peer"
        captum = [peer for peer in record["peers"] if peer["library"] == "captum"]
        assert captum and captum[0]["status"] == "ok", captum
        assert captum[0]["time_s_per_image"] > 0 and captum[0]["ours_speedup"] > 0
    # Captum's occlusion is tried at several batchings and the fastest kept
    occlusion = next(p for p in records["occlusion"]["peers"] if p["name"] == "Occlusion")
    assert occlusion["variant"] in occlusion["variants_s_per_image"]
    assert occlusion["time_s_per_image"] == min(occlusion["variants_s_per_image"].values())
    # the node runs occlusion on the torch module (incremental inference), not on the ONNX pool it
    # is also timed on; a gradient method has no ONNX time
    assert records["occlusion"]["node_path"] == NODE_ON_MODULE and records["occlusion"]["onnx_time_s_per_image"] > 0
    assert "node_path" not in records["gradcam"]
    # a peer library that is absent is reported, not a crash
    for peer in records["gradcam"]["peers"]:
        assert peer["status"] == "ok" or peer["status"].startswith(("not installed", "failed"))


def test_forward_rows_follow_the_methods(figures: tuple[dict, Path]) -> None:
    """Occlusion: one clean pass per image plus one per window position, all without gradients;
    Grad-CAM: one forward pass per image, without gradients at the input (autograd starts at the
    CAM layer). Captum's occlusion makes the same passes."""
    data, _ = figures
    records = {record["method"]: record for record in data["results"]}
    windows = len(window_masks(224, WINDOW, STRIDE, torch.device("cpu"))) ** 2
    occlusion = records["occlusion"]
    assert occlusion["nograd_rows"] == windows + 1 and occlusion["grad_rows"] == 0
    assert occlusion["forward_only"] is True
    captum = next(p for p in occlusion["peers"] if p["name"] == "Occlusion")
    assert captum["forward_rows"] == windows + 1
    gradcam = records["gradcam"]
    assert (gradcam["grad_rows"], gradcam["nograd_rows"]) == (0, 1)
    assert gradcam["forward_only"] is False
    assert data["goals"], "occlusion's goals are checked"


def test_densenet121_size() -> None:
    model = densenet121()
    assert 6.5e6 <= parameter_count(model) <= 8e6
    assert not model.training
    with torch.no_grad():
        logits = model(torch.zeros(1, 1, 64, 64))
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_requests_checked_before_any_work() -> None:
    with pytest.raises(ExplainerError, match="unknown explainer 'nope'"):
        check_request(["nope"], ["demo"], 1, 1, 0)
    with pytest.raises(ValueError, match="unknown bench model 'vgg'"):
        check_request(None, ["vgg"], 1, 1, 0)
    assert check_request(["occlusion", "occlusion:healthy"], ["demo"], 1, 1, 0) == ["occlusion", "occlusion:healthy"]
    with pytest.raises(ExplainerError, match="unknown explainer 'nope'"):
        check_request(["nope:healthy"], ["demo"], 1, 1, 0)
    assert parse_param("occlusion:healthy.perturbation=healthy") == ("occlusion:healthy", "perturbation", "healthy")
    assert parse_param("rise.masks=250") == ("rise", "masks", 250)
    assert parse_param("hipe.perturbation=blur") == ("hipe", "perturbation", "blur")
    with pytest.raises(ValueError, match="METHOD.SETTING=VALUE"):
        parse_param("masks=250")
