"""Grad-CAM and occlusion against Captum, the batch contract, and the model left as found."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from captum.attr import Occlusion as CaptumOcclusion
from torch import nn

from service.explain.base import ExplainerError
from service.explain.hooks import LayerRecorder, resolve_module
from service.explain.methods.cam import GradCAM
from service.explain.methods.occlusion import Occlusion
from service.explain.registry import available_explainers, get_explainer
from service.inference.runner import Runner
from tests.unit.service.explain.explainer_checks import hook_count, left_as_found
from tests.unit.service.explain.explainer_models import Boom, build
from tests.unit.service.explain.explainer_models import images as blob_images

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SIZE = 64
TARGETS = [0, 1, 2, 1]


# --- models -------------------------------------------------------------------------------------


def conv_bn_relu(cin: int, cout: int, inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=inplace))


def head(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))


class SeqNet(nn.Module):
    """conv-bn-relu blocks + GAP + linear; ``features.4`` (the last conv) is the CAM layer."""

    target = "features.4"

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 8, inplace),
            nn.MaxPool2d(2),
            conv_bn_relu(8, 16, inplace),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(inplace=inplace),
        )
        self.head = head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ReusedReluNet(nn.Module):
    """One ReLU module called after every conv."""

    target = "conv3"

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.relu = nn.ReLU()
        self.head = head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv3(self.relu(self.conv2(self.relu(self.conv1(x)))))))


class FunctionalReluNet(nn.Module):
    """ReLU and pooling as functions, not modules."""

    target = "conv2"

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.head(torch.relu(self.conv2(x)))


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    """The shared blob images at this file's size, with wider blobs away from the border."""
    return blob_images(n, seed, SIZE, margin=8, sigma=6.0)


def predicted(model: nn.Module, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model(x).argmax(dim=1).tolist()


MODELS = {
    "seq": lambda: build(SeqNet),
    "inplace": lambda: build(SeqNet, True),
    "reused": lambda: build(ReusedReluNet),
    "functional": lambda: build(FunctionalReluNet),
}


class OnnxRunner:
    """Minimal Runner on ONNX Runtime (no torch module, so forward-only explainers only)."""

    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    @property
    def device(self) -> str:
        return "CPUExecutionProvider"

    @property
    def torch_module(self) -> None:
        return None

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]


@pytest.fixture(scope="module")
def onnx_runner(tmp_path_factory: pytest.TempPathFactory) -> OnnxRunner:
    path = tmp_path_factory.mktemp("onnx") / "seq.onnx"
    torch.onnx.export(
        MODELS["inplace"](),
        (images(2),),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )
    runner = OnnxRunner(path)
    assert isinstance(runner, Runner)
    return runner


# --- helpers ------------------------------------------------------------------------------------


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    assert a.std() > 0 and b.std() > 0, "constant map: the comparison would say nothing"
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def assert_matches(ours: torch.Tensor, reference: torch.Tensor, rel_atol: float = 1e-4) -> None:
    """Per-sample Pearson >= 0.99 and nearly equal values."""
    assert ours.shape == reference.shape
    for sample, (mine, theirs) in enumerate(zip(ours, reference)):
        assert pearson(mine, theirs) >= 0.99, f"sample {sample}"
    torch.testing.assert_close(ours, reference, rtol=0, atol=rel_atol * float(reference.abs().max()) + 1e-7)


def captum_gradcam(
    model: nn.Module, layer: str, x: torch.Tensor, targets: list[int], relu: bool = True
) -> torch.Tensor:
    cam = LayerGradCam(model, resolve_module(model, layer))
    attribution = cam.attribute(x, target=targets, relu_attributions=relu)
    return LayerAttribution.interpolate(attribution, (SIZE, SIZE), "bilinear")[:, 0].detach()


def captum_occlusion(model: nn.Module, x: torch.Tensor, window: int, stride: int, baseline: float) -> torch.Tensor:
    attribution = CaptumOcclusion(model).attribute(
        x,
        sliding_window_shapes=(1, window, window),
        strides=(1, stride, stride),
        baselines=baseline,
        target=TARGETS[: len(x)],
        perturbations_per_eval=64,
    )
    return attribution[:, 0]


# --- Grad-CAM -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_gradcam_matches_captum(kind: str) -> None:
    """With ReLU, explaining the predicted class (other classes may give an all-zero map)."""
    model, x = MODELS[kind](), images()
    targets = predicted(model, x)
    ours = GradCAM(target_layer=model.target).explain(model, x, targets)
    assert ours.shape == (4, SIZE, SIZE) and ours.dtype == torch.float32
    assert_matches(ours, captum_gradcam(model, model.target, x, targets))


@pytest.mark.parametrize("kind", MODELS)
def test_gradcam_without_relu_matches_captum(kind: str) -> None:
    model, x = MODELS[kind](), images()
    ours = GradCAM(target_layer=model.target, relu=False).explain(model, x, TARGETS)
    assert (ours < 0).any() and (ours > 0).any()
    assert_matches(ours, captum_gradcam(model, model.target, x, TARGETS, relu=False))


def test_gradcam_default_layer_is_last_conv() -> None:
    model, x = MODELS["seq"](), images(2)
    assert resolve_module(model, None) is model.features[4]
    torch.testing.assert_close(
        GradCAM().explain(model, x, [0, 1]), GradCAM(target_layer="features.4").explain(model, x, [0, 1])
    )


def test_gradcam_with_frozen_parameters() -> None:
    model, x = MODELS["seq"](), images(2)
    expected = GradCAM().explain(model, x, [0, 1])
    model.requires_grad_(False)
    torch.testing.assert_close(GradCAM().explain(model, x, [0, 1]), expected)
    assert not any(p.requires_grad for p in model.parameters())


def test_gradcam_works_under_no_grad_and_inference_mode() -> None:
    model, x = MODELS["seq"](), images(2)
    expected = GradCAM().explain(model, x, [0, 1])
    with torch.no_grad():
        torch.testing.assert_close(GradCAM().explain(model, x, [0, 1]), expected)
    with torch.inference_mode():
        torch.testing.assert_close(GradCAM().explain(model, x.clone(), [0, 1]), expected)


# --- occlusion ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "stride", "baseline"),
    [(16, 8, 0.0), (16, 16, 1.0), (10, 7, -0.5)],  # (64 - 10) / 7 is not whole: cropped last window
)
def test_occlusion_matches_captum(window: int, stride: int, baseline: float) -> None:
    model, x = MODELS["seq"](), images()
    ours = Occlusion(window=window, stride=stride, baseline=baseline, chunk_size=30).explain(model, x, TARGETS)
    assert ours.shape == (4, SIZE, SIZE) and ours.dtype == torch.float32
    assert_matches(ours, captum_occlusion(model, x, window, stride, baseline), rel_atol=1e-5)


def test_occlusion_on_onnx_runner_matches_captum(onnx_runner: OnnxRunner) -> None:
    model, x = MODELS["inplace"](), images()
    ours = Occlusion(window=10, stride=7, chunk_size=50).explain(onnx_runner, x, TARGETS)
    assert_matches(ours, captum_occlusion(model, x, 10, 7, 0.0), rel_atol=1e-3)


def test_occlusion_on_torchscript_module() -> None:
    model, x = MODELS["seq"](), images(2)
    explainer = Occlusion(window=16, stride=8)
    torch.testing.assert_close(
        explainer.explain(torch.jit.script(model), x, [0, 1]), explainer.explain(model, x, [0, 1])
    )


# --- batch contract, determinism, model left as found --------------------------------------------

EXPLAINERS = {
    "gradcam": lambda: GradCAM(target_layer="features.4", relu=False),  # signed: no all-zero maps
    "occlusion": lambda: Occlusion(window=16, stride=8, chunk_size=20),  # 49 windows: chunks span images
}


@pytest.mark.parametrize("method", EXPLAINERS)
def test_batch_equals_single_runs(method: str) -> None:
    model, x, explainer = MODELS["inplace"](), images(), EXPLAINERS[method]()
    batched = explainer.explain(model, x, TARGETS)
    singles = torch.cat([explainer.explain(model, x[i : i + 1], [t]) for i, t in enumerate(TARGETS)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", EXPLAINERS)
def test_deterministic(method: str) -> None:
    model, x, explainer = MODELS["seq"](), images(), EXPLAINERS[method]()
    assert torch.equal(explainer.explain(model, x, TARGETS), explainer.explain(model, x, TARGETS))


@pytest.mark.parametrize("method", EXPLAINERS)
def test_model_left_as_found(method: str) -> None:
    model, x = MODELS["inplace"](), images()
    with left_as_found(model, x, frozen=model.features[0][0].weight, eval_part=model.head):
        EXPLAINERS[method]().explain(model, x, TARGETS)


@pytest.mark.parametrize("method", EXPLAINERS)
def test_hooks_and_mode_released_after_exception_in_forward(method: str) -> None:
    model = MODELS["seq"]()
    boom = Boom()
    model.features.append(boom)  # runs after the target layer, so its hooks are already in place
    model.train()
    boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        EXPLAINERS[method]().explain(model, images(2), [0, 1])
    assert hook_count(model) == 0
    assert all(m.training for m in model.modules())


def test_recorder_keeps_pre_inplace_activation_and_gradient() -> None:
    model, x = MODELS["inplace"](), images(2)
    layer = model.features[4]
    with LayerRecorder(layer) as recorder:
        logits = model(x.requires_grad_(True))
        recorder.backprop(logits[:, 0].sum())
    call = recorder.only_call()
    assert (call.activation < 0).any()  # the copy was taken before the in-place ReLU
    assert hook_count(model) == 0
    features = model.features[:4](x.detach())
    pre_relu = layer(features).requires_grad_(True)
    (expected,) = torch.autograd.grad(model.head(torch.relu(pre_relu))[:, 0].sum(), pre_relu)
    torch.testing.assert_close(call.gradient, expected)
    torch.testing.assert_close(call.activation, pre_relu.detach())


def test_recorder_differentiating_from_the_layer_gives_the_same_gradient() -> None:
    """With gradients off below the layer, the layer's gradient is the one of a full graph, the
    in-place ReLU after the layer still runs, and the grad mode found is restored."""
    model, x = MODELS["inplace"](), images(2)
    layer = model.features[4]
    with LayerRecorder(layer) as full:
        full.backprop(model(x.clone().requires_grad_(True))[:, 0].sum())
    with torch.no_grad():
        with LayerRecorder(layer, differentiate_from=0) as cut:
            logits = model(x.clone())
            assert torch.is_grad_enabled() and logits.requires_grad
            cut.backprop(logits[:, 0].sum())
        assert not torch.is_grad_enabled()  # the mode found is restored on exit
    torch.testing.assert_close(cut.only_call().gradient, full.only_call().gradient)
    torch.testing.assert_close(cut.only_call().activation, full.only_call().activation)
    assert hook_count(model) == 0


@pytest.mark.parametrize("method", ["gradcam", "gradcam_pp"])
def test_cam_backward_stops_at_the_layer(method: str) -> None:
    """Nothing below the CAM layer is differentiated (or kept for it): a backward hook on the
    first convolution never fires, while the map still matches a full-graph reference."""
    model, x = MODELS["seq"](), images(2)
    reached: list[str] = []
    handle = model.features[0][0].register_full_backward_hook(lambda *_: reached.append("conv0"))
    try:
        get_explainer(method, target_layer=model.target).explain(model, x, [0, 1])
    finally:
        handle.remove()
    assert reached == []
    handle = model.features[0][0].register_full_backward_hook(lambda *_: reached.append("conv0"))
    try:
        model(x.clone().requires_grad_(True))[:, 0].sum().backward()  # the hook does fire on a full graph
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    assert reached == ["conv0"]


# --- errors -------------------------------------------------------------------------------------


def test_gradcam_on_runner_without_torch_module(onnx_runner: OnnxRunner) -> None:
    with pytest.raises(ExplainerError, match="gradcam needs gradients"):
        GradCAM().explain(onnx_runner, images(1), [0])


def test_unknown_target_layer_is_named() -> None:
    with pytest.raises(ExplainerError, match=r"unknown target layer 'features\.99'.*'head\.2'"):
        GradCAM(target_layer="features.99").explain(MODELS["seq"](), images(1), [0])


def test_gradcam_on_torchscript_module() -> None:
    scripted = torch.jit.script(MODELS["seq"]())
    assert resolve_module(scripted, None) is dict(scripted.named_modules())["features.4"]
    assert resolve_module(scripted, "features.4").original_name == "Conv2d"
    with pytest.raises(ExplainerError, match="TorchScript"):
        GradCAM().explain(scripted, images(1), [0])


def test_gradcam_on_layer_run_several_times() -> None:
    with pytest.raises(ExplainerError, match="ran 3 times"):
        GradCAM(target_layer="relu").explain(MODELS["reused"](), images(1), [0])


def test_gradcam_on_layer_without_spatial_output() -> None:
    with pytest.raises(ExplainerError, match=r"head\.2 gives shape \(1, 3\)"):
        GradCAM(target_layer="head.2").explain(MODELS["seq"](), images(1), [0])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"window": 0}, "window must be a positive integer, got 0"),
        ({"stride": -1}, "stride must be a positive integer, got -1"),
        ({"chunk_size": 1.5}, "chunk_size must be a positive integer, got 1.5"),
        ({"window": True}, "window must be a positive integer, got True"),
        ({"baseline": float("nan")}, "baseline must be a finite number, got nan"),
        ({"baseline": "0"}, "baseline must be a finite number, got '0'"),
        ({"window": 4, "stride": 5}, r"stride \(5\) must not exceed window \(4\)"),
    ],
)
def test_bad_occlusion_settings(params: dict[str, object], message: str) -> None:
    with pytest.raises(ExplainerError, match=message):
        Occlusion(**params)  # type: ignore[arg-type]


def test_occlusion_window_larger_than_image() -> None:
    with pytest.raises(ExplainerError, match=r"window \(100\) is larger than the 64x64 image"):
        Occlusion(window=100).explain(MODELS["seq"](), images(1), [0])


@pytest.mark.parametrize("method", EXPLAINERS)
def test_target_errors(method: str) -> None:
    model, explainer = MODELS["seq"](), EXPLAINERS[method]()
    with pytest.raises(ExplainerError, match="batch has 2 samples, got 3 targets"):
        explainer.explain(model, images(2), [0, 1, 2])
    with pytest.raises(ExplainerError, match=r"targets \[0, 3\] out of range for a model with 3 classes"):
        explainer.explain(model, images(2), [0, 3])


def test_bad_gradcam_settings() -> None:
    with pytest.raises(ExplainerError, match="target_layer must be a non-empty layer name or None, got ''"):
        GradCAM(target_layer="")
    with pytest.raises(ExplainerError, match="relu must be True or False, got 1"):
        GradCAM(relu=1)  # type: ignore[arg-type]


# --- registry -----------------------------------------------------------------------------------


def test_registry() -> None:
    assert {"gradcam", "occlusion"} <= set(available_explainers())
    explainer = get_explainer("gradcam", target_layer="features.4")
    assert isinstance(explainer, GradCAM) and explainer.target_layer == "features.4"
    assert isinstance(get_explainer("occlusion", window=8, stride=4), Occlusion)
    with pytest.raises(ExplainerError, match=r"unknown explainer 'gradcamm'; available: .*gradcam.*occlusion"):
        get_explainer("gradcamm")
    with pytest.raises(ExplainerError, match=r"unknown setting\(s\) 'size' for explainer 'occlusion'"):
        get_explainer("occlusion", size=3)


# --- a model shared by threads ---------------------------------------------------------------------


class Rendezvous(nn.Module):
    """When armed, holds the first forward pass of each thread until ``parties`` threads are
    inside the model at once (later passes of a thread go straight through)."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=20)
        self.armed = False
        self._held: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed and threading.get_ident() not in self._held:
            self._held.add(threading.get_ident())
            self.barrier.wait()
        return x


def test_explainers_on_a_model_shared_by_threads() -> None:
    """Grad-CAM and CAM in two threads and a plain forward pass in a third, all inside the same
    modules at once (held together before the CAM layer, after every hook is registered), as the
    node's pipeline threads, warm-up and inference pool do: each thread gets what it gets alone."""
    gate = Rendezvous(3)
    model = nn.Sequential(OrderedDict(gate=gate, net=SeqNet())).eval()  # deployed models are in eval mode
    layer = "net.features.4"
    x = images()
    jobs = {
        "gradcam": lambda: GradCAM(target_layer=layer).explain(model, x[:2], [0, 1]),
        "cam": lambda: get_explainer("cam").explain(model, x[2:], [2, 1]),
        "forward": lambda: model(x).detach(),
    }
    expected = {name: job() for name, job in jobs.items()}
    gate.armed = True
    results: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            results[name] = jobs[name]()
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for name, value in expected.items():
        torch.testing.assert_close(results[name], value, msg=name)
    assert hook_count(model) == 0
