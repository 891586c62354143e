"""Gradient and propagation explainers against Captum, their axioms, the batch contract, and the
model left as found.

Captum is the independent reference at matched settings. Where Captum's own implementation
departs from the method, the test gives Captum an equivalent model on which it is right, and says
why next to the helper:

- SmoothGrad: Captum's NoiseTunnel draws its noise with ``torch.normal``; the test patches that
  call to return exactly our noise (:func:`smoothgrad_noise`, scaled by each sample's sigma), so
  the two average over identical noisy inputs.
- Integrated gradients ``riemann_trapezoid``: Captum's weights sum to ``(n - 1) / n`` (``1/n``
  halved at both ends on ``n`` nodes spanning [0, 1]); ours are the trapezoid rule's ``1/(n-1)``.
  Captum's map is compared with ours times ``(n - 1) / n``.
- DeepLIFT: when a ReLU's output tensor is also a MaxPool's input tensor, Captum's tensor hooks
  run in registration order and the ReLU reads the plain max-pool gradient instead of the
  max-pool multiplier, so its attributions do not sum to the output difference (off by 0.09 and
  0.16 logits on the demo phantoms). Captum gets the same network with a ``clone()`` before each
  max pool, where it is exact.
- LRP: Captum gives batch norm its own epsilon rule; here batch norm is folded into the
  convolution before it, so Captum gets a folded copy (torch's ``fuse_conv_bn_eval``) and the demo
  head as a plain ``nn.Linear`` (Captum only accepts its own layer types). Captum's epsilon is
  1e-9; ours is set to the same.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LRP as CaptumLRP
from captum.attr import Deconvolution as CaptumDeconvolution
from captum.attr import DeepLift as CaptumDeepLift
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import InputXGradient as CaptumInputXGradient
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from captum.attr import NoiseTunnel
from captum.attr import Saliency as CaptumSaliency
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dicom_io.pixels import prepare_frames
from service.explain.base import ExplainerError
from service.explain.methods.gradient import (
    Deconvnet,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
    smoothgrad_noise,
)
from service.explain.methods.propagation import LRP, DeepLift
from service.explain.registry import available_explainers, get_explainer
from service.inference.deployed import DeployedModel
from service.models import demo_card_path
from service.synthetic.phantoms import make_phantom
from tests.unit.service.explain.explainer_checks import hook_count, left_as_found
from tests.unit.service.explain.explainer_models import (
    SIZE,
    Boom,
    DenseNetLike,
    ResidualNet,
    build,
    conv_bn_relu,
    function_modes,
    images,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Captum announces every hook it sets
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

TARGETS = [0, 1, 2, 1]

# --- models -------------------------------------------------------------------------------------


class SeqNet(nn.Module):
    """conv-bn-relu, max pool, conv-bn-relu, GAP, linear: 3 classes."""

    def __init__(self, norm: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 8, norm=norm, bias=bias),
            nn.MaxPool2d(2),
            conv_bn_relu(8, 16, norm=norm, bias=bias),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Clone(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "seq": lambda: build(SeqNet),
    "densenet": lambda: build(DenseNetLike),
    "residual": lambda: build(ResidualNet, "reused"),
    "functional": lambda: build(ResidualNet, "functional"),
}


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[DeployedModel, nn.Module, torch.Tensor, list[int]]]:
    """The shipped demo model, eager, and two held-out phantoms (a nodule, an effusion) at 224²."""
    deployed = DeployedModel.from_card_path(demo_card_path())
    card = deployed.card
    phantoms = [make_phantom(i, kind, seed=515151, cols=448) for i, kind in enumerate(("nodule", "effusion"))]
    frames = [prepare_frames(p.dataset, card.input.spec())[0] for p in phantoms]
    batch = torch.from_numpy(deployed.normalise(np.stack([frame.model_input for frame in frames])))
    targets = [card.output.classes.index("nodule"), card.output.classes.index("effusion")]
    yield deployed, deployed.gradient_runner.torch_module, batch, targets


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the small models gain nothing from more, and on a shared machine
    spinning worker threads make the run time erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- helpers ------------------------------------------------------------------------------------


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    assert a.std() > 0 and b.std() > 0, "constant map: the comparison would say nothing"
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def assert_matches(ours: torch.Tensor, reference: torch.Tensor, rel_atol: float = 1e-4) -> None:
    """Per-sample Pearson >= 0.99 and nearly equal values."""
    reference = reference.detach().to(torch.float32)
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    for sample, (mine, theirs) in enumerate(zip(ours, reference)):
        assert pearson(mine, theirs) >= 0.99, f"sample {sample}"
    torch.testing.assert_close(ours, reference, rtol=0, atol=rel_atol * float(reference.abs().max()) + 1e-7)


def target_logits(model: nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(x).gather(1, torch.tensor(targets)[:, None])[:, 0].double()


def fold_for_captum(model: nn.Module) -> nn.Module:
    """A copy with every (Conv2d, BatchNorm2d) pair inside a Sequential fused into one Conv2d.

    The demo's zero-sum head becomes the equivalent ``nn.Linear`` (Captum's LRP takes only its
    own layer types).
    """
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.children())
        kept: list[nn.Module] = []
        for child in children:
            if isinstance(child, nn.BatchNorm2d) and kept and isinstance(kept[-1], nn.Conv2d):
                kept[-1] = fuse_conv_bn_eval(kept[-1], child)
            else:
                kept.append(child)
        for key in list(parent._modules):
            del parent._modules[key]
        for i, child in enumerate(kept):
            parent.add_module(str(i), child)
    classifier = getattr(model, "classifier", None)
    if classifier is not None and hasattr(classifier, "centred_weight"):
        linear = nn.Linear(classifier.in_features, classifier.out_features)
        with torch.no_grad():
            linear.weight.copy_(classifier.centred_weight())
            linear.bias.copy_(classifier.bias - classifier.bias.mean())
        model.classifier = linear
    return model


def clone_before_maxpool(model: nn.Module) -> nn.Module:
    """A copy with ``x.clone()`` before every MaxPool2d (see the module docstring, DeepLIFT)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if isinstance(child, nn.MaxPool2d):
                parent._modules[key] = nn.Sequential(Clone(), child)
    return model


class patched_captum_noise:
    """While active, Captum's NoiseTunnel adds exactly our SmoothGrad noise.

    NoiseTunnel calls ``torch.normal(0, stdevs)`` once with shape ``[B * n, C, H, W]``, sample-major
    (row ``b * n + s`` is sample ``b``, draw ``s``); the patch returns
    ``sigma_b * smoothgrad_noise(seed, s)`` in that layout.
    """

    def __init__(self, explainer: SmoothGrad, x: torch.Tensor) -> None:
        sigma = explainer.noise_std(x)
        noise = torch.stack([smoothgrad_noise(explainer.seed, s, x.shape[1:]) for s in range(explainer.samples)])
        self.noise = (sigma.view(-1, 1, 1, 1, 1) * noise[None]).flatten(0, 1)
        self.calls = 0

    def __enter__(self) -> patched_captum_noise:
        self.original = torch.normal

        def fake(mean: object, std: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            assert std.shape == self.noise.shape
            self.calls += 1
            return self.noise.clone()

        torch.normal = fake  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        torch.normal = self.original  # type: ignore[assignment]


def captum_maps(attribution: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    attribution = attribution.detach()
    if reduce == "sum":
        return attribution.sum(dim=1)
    index = attribution.abs().argmax(dim=1, keepdim=True)
    return attribution.gather(1, index)[:, 0]


# --- Captum references on the demo model and the DenseNet-like model -----------------------------


def reference_cases() -> list[tuple[str, Callable[[], Any], Callable[[nn.Module, torch.Tensor, list[int]], Any]]]:
    """(name, our explainer, Captum's map for (model, x, targets))."""
    return [
        (
            "saliency",
            lambda: Saliency(),
            lambda m, x, t: captum_maps(CaptumSaliency(m).attribute(x, target=t, abs=True), "max_abs"),
        ),
        (
            "saliency_signed",
            lambda: Saliency(absolute=False),
            lambda m, x, t: captum_maps(CaptumSaliency(m).attribute(x, target=t, abs=False), "max_abs"),
        ),
        (
            "input_x_gradient",
            InputXGradient,
            lambda m, x, t: captum_maps(CaptumInputXGradient(m).attribute(x, target=t)),
        ),
        (
            "integrated_gradients",
            lambda: IntegratedGradients(steps=16, internal_batch_size=24),
            lambda m, x, t: captum_maps(
                CaptumIntegratedGradients(m).attribute(x, target=t, n_steps=16, method="gausslegendre")
            ),
        ),
        (
            "guided_backprop",
            GuidedBackprop,
            lambda m, x, t: captum_maps(CaptumGuidedBackprop(m).attribute(x, target=t)),
        ),
        ("deconvnet", Deconvnet, lambda m, x, t: captum_maps(CaptumDeconvolution(m).attribute(x, target=t))),
        (
            "deeplift",
            DeepLift,
            lambda m, x, t: captum_maps(CaptumDeepLift(clone_before_maxpool(m)).attribute(x, target=t, baselines=0.0)),
        ),
        (
            "lrp",
            lambda: LRP(epsilon=1e-9),
            lambda m, x, t: captum_maps(CaptumLRP(fold_for_captum(m)).attribute(x, target=t)),
        ),
    ]


CASES = {name: (ours, theirs) for name, ours, theirs in reference_cases()}


@pytest.mark.parametrize("method", CASES)
def test_demo_model_matches_captum(method: str, demo: tuple[Any, nn.Module, torch.Tensor, list[int]]) -> None:
    _, model, x, targets = demo
    ours, theirs = CASES[method]
    maps = ours().explain(model, x, targets)
    assert maps.shape == (2, 224, 224)
    assert_matches(maps, theirs(model, x, targets))


@pytest.mark.parametrize("method", CASES)
def test_densenet_like_matches_captum(method: str) -> None:
    model, x = MODELS["densenet"](), images()
    ours, theirs = CASES[method]
    assert_matches(ours().explain(model, x, TARGETS), theirs(model, x, TARGETS))


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle", "riemann_trapezoid", "riemann_left"])
def test_integrated_gradients_quadratures_match_captum(method: str) -> None:
    model, x = MODELS["densenet"](), images()
    ours = IntegratedGradients(steps=12, method=method, internal_batch_size=10).explain(model, x, TARGETS)
    theirs = captum_maps(CaptumIntegratedGradients(model).attribute(x, target=TARGETS, n_steps=12, method=method))
    if method == "riemann_trapezoid":  # Captum's trapezoid weights sum to (n - 1) / n
        ours = ours * (11 / 12)
    assert_matches(ours, theirs)


@pytest.mark.parametrize(
    ("variant", "base", "base_params"),
    [
        ("smoothgrad", "saliency", {}),
        ("smoothgrad_sq", "saliency", {"absolute": False}),
        ("vargrad", "saliency", {"absolute": False}),
        ("smoothgrad", "integrated_gradients", {"steps": 8}),
    ],
)
def test_smoothgrad_matches_captum_noise_tunnel(variant: str, base: str, base_params: dict[str, Any]) -> None:
    """Same noise on both sides (see :class:`patched_captum_noise`)."""
    model, x = MODELS["densenet"](), images()
    explainer = get_explainer("smoothgrad", base=base, base_params=base_params, samples=6, variant=variant, seed=3)
    ours = explainer.explain(model, x, TARGETS)
    if base == "saliency":
        method, kwargs, reduce = CaptumSaliency(model), {"abs": base_params.get("absolute", True)}, "max_abs"
    else:
        method, kwargs, reduce = CaptumIntegratedGradients(model), {"n_steps": 8}, "sum"
    with patched_captum_noise(explainer, x) as patch:
        theirs = NoiseTunnel(method).attribute(x, nt_type=variant, nt_samples=6, stdevs=1.0, target=TARGETS, **kwargs)
    assert patch.calls == 1
    assert_matches(ours, captum_maps(theirs, reduce))


def test_smoothgrad_on_demo_matches_captum(demo: tuple[Any, nn.Module, torch.Tensor, list[int]]) -> None:
    _, model, x, targets = demo
    explainer = SmoothGrad(Saliency(), samples=4, noise_level=0.1, seed=11, internal_batch_size=4)
    ours = explainer.explain(model, x, targets)
    with patched_captum_noise(explainer, x):
        theirs = NoiseTunnel(CaptumSaliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=4, target=targets)
    assert_matches(ours, captum_maps(theirs, "max_abs"))


def test_saliency_reduces_channels_by_largest_magnitude() -> None:
    """Three input channels: Captum's per-channel gradient, reduced to the largest magnitude."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    x = torch.randn(2, 3, 16, 16)
    gradient = CaptumSaliency(model).attribute(x, target=[0, 2], abs=False)
    torch.testing.assert_close(Saliency(absolute=False).explain(model, x, [0, 2]), captum_maps(gradient, "max_abs"))
    torch.testing.assert_close(Saliency().explain(model, x, [0, 2]), gradient.abs().amax(dim=1))
    torch.testing.assert_close(
        InputXGradient().explain(model, x, [0, 2]), (x * gradient).sum(dim=1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("style", ["reused", "functional"])
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "deeplift", "lrp"])
def test_reused_and_functional_relu_match_captum_on_distinct_modules(method: str, style: str) -> None:
    """Captum hooks nn.ReLU modules; the same network with one reused ReLU, or with functional
    relu calls, must give the same maps from ours as Captum gives with distinct modules."""
    x = images()
    ours = {
        "guided_backprop": GuidedBackprop,
        "deconvnet": Deconvnet,
        "deeplift": DeepLift,
        "lrp": lambda: LRP(epsilon=1e-9),
    }[method]().explain(build(ResidualNet, style, norm=False), x, TARGETS)
    reference = build(ResidualNet, "captum", norm=False)
    captum = {
        "guided_backprop": CaptumGuidedBackprop,
        "deconvnet": CaptumDeconvolution,
        "deeplift": CaptumDeepLift,
        "lrp": CaptumLRP,
    }[method](reference)
    assert_matches(ours, captum_maps(captum.attribute(x, target=TARGETS)))


# --- axioms -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("steps", "bound"), [(64, 0.015), (128, 0.01)])
def test_integrated_gradients_completeness_on_demo(
    steps: int, bound: float, demo: tuple[Any, nn.Module, torch.Tensor, list[int]]
) -> None:
    """Completeness error relative to |f(x) - f(x0)|.

    On the demo phantoms the integrand d f/d alpha swings between about -22 and +20 along the
    path for a net difference of 2.4 logits (ReLU and max-pool switches make it discontinuous),
    so the quadrature error at 64 Gauss-Legendre nodes is 0.7-1.3% of the difference on nine
    held-out phantoms; it is below 0.7% at 128 nodes and below 0.2% at 256.
    """
    _, model, x, targets = demo
    maps, delta = IntegratedGradients(steps=steps).explain_with_delta(model, x, targets)
    difference = target_logits(model, x, targets) - target_logits(model, torch.zeros_like(x), targets)
    torch.testing.assert_close(delta.double(), (maps.double().sum(dim=(1, 2)) - difference).abs(), rtol=1e-4, atol=1e-4)
    print(f"IG completeness error at {steps} steps: {(delta.double() / difference.abs()).tolist()}")
    assert (delta.double() <= bound * difference.abs()).all(), (delta, difference)


@pytest.mark.parametrize("kind", ["demo", "seq", "densenet", "residual", "functional"])
def test_deeplift_summation_to_delta(kind: str, demo: tuple[Any, nn.Module, torch.Tensor, list[int]]) -> None:
    if kind == "demo":
        _, model, x, targets = demo
    else:
        model, x, targets = MODELS[kind](), images(), TARGETS
    maps, delta = DeepLift(baseline=-0.5).explain_with_delta(model, x, targets)
    difference = target_logits(model, x, targets) - target_logits(model, torch.full_like(x, -0.5), targets)
    assert (maps.double().sum(dim=(1, 2)) - difference).abs().max() <= 1e-4
    assert delta.max() <= 1e-4


@pytest.mark.parametrize("kind", ["seq", "densenet", "residual", "functional"])
def test_lrp_conserves_relevance_without_bias(kind: str) -> None:
    model = {
        "seq": lambda: build(SeqNet, norm=False, bias=False),
        "densenet": lambda: build(DenseNetLike, norm=False, bias=False),
        "residual": lambda: build(ResidualNet, "reused", norm=False, bias=False),
        "functional": lambda: build(ResidualNet, "functional", norm=False, bias=False),
    }[kind]()
    x = images()
    logits = target_logits(model, x, TARGETS)
    for composite in ("epsilon", "zplus"):
        maps, delta = LRP(composite=composite, epsilon=1e-9).explain_with_delta(model, x, TARGETS)
        assert (maps.double().sum(dim=(1, 2)) - logits).abs().max() <= 1e-3 * logits.abs().max(), composite
        assert (delta.double() <= 1e-3 * logits.abs()).all(), composite


def linear_models() -> dict[str, nn.Module]:
    torch.manual_seed(5)
    return {
        "linear": nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 3, bias=False)).eval(),
        "conv": nn.Sequential(nn.Conv2d(1, 3, SIZE, bias=False), nn.Flatten()).eval(),
    }


def linear_weights(model: nn.Module) -> torch.Tensor:
    """``[3, H, W]``: the weight image of each class."""
    layer = model[0] if isinstance(model[0], nn.Conv2d) else model[1]
    return layer.weight.detach().reshape(3, SIZE, SIZE)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_linear_model_attributions_are_weight_times_difference(kind: str) -> None:
    model = linear_models()[kind]
    x = images()
    w = linear_weights(model)[TARGETS]
    for baseline in (0.0, 0.7):
        expected = w * (x[:, 0] - baseline)
        for explainer in (IntegratedGradients(steps=4, baseline=baseline), DeepLift(baseline=baseline)):
            torch.testing.assert_close(explainer.explain(model, x, TARGETS), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(LRP(composite="epsilon").explain(model, x, TARGETS), w * x[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(InputXGradient().explain(model, x, TARGETS), w * x[:, 0], rtol=0, atol=1e-5)


def test_lrp_rules_on_a_linear_model_follow_their_formulas() -> None:
    """One layer, so each rule's share of the output is its formula on ``x_i w_i``."""
    model = linear_models()["linear"]
    x = images()
    w = linear_weights(model)[TARGETS].flatten(1)
    flat = x.flatten(1)
    out = (w * flat).sum(dim=1, keepdim=True)
    contributions = w * flat
    positive, negative = contributions.clamp(min=0), contributions.clamp(max=0)

    def lrp(**params: Any) -> torch.Tensor:
        return LRP(epsilon=1e-9, **params).explain(model, x, TARGETS).flatten(1)

    gamma_weights = w + 0.25 * w.clamp(min=0)
    expected_gamma = flat * gamma_weights * out / (flat * gamma_weights).sum(dim=1, keepdim=True)
    expected_alpha_beta = out * (
        2 * positive / positive.sum(1, keepdim=True) - negative / negative.sum(1, keepdim=True)
    )
    low, high = -2.0, 3.0
    box = contributions - low * w.clamp(min=0) - high * w.clamp(max=0)
    expected_box = out * box / box.sum(dim=1, keepdim=True)
    torch.testing.assert_close(lrp(composite="gamma"), expected_gamma, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lrp(composite="alpha_beta"), expected_alpha_beta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        lrp(composite="zplus"), out * positive / positive.sum(1, keepdim=True), rtol=1e-4, atol=1e-5
    )
    # The linear layer reads the pixels, but epsilon_gamma_box gives linear layers epsilon.
    conv = linear_models()["conv"]
    conv_box = LRP(composite="epsilon_gamma_box", low=low, high=high, epsilon=1e-9).explain(conv, x, TARGETS)
    w_conv = linear_weights(conv)[TARGETS].flatten(1)
    box = w_conv * flat - low * w_conv.clamp(min=0) - high * w_conv.clamp(max=0)
    out_conv = (w_conv * flat).sum(dim=1, keepdim=True)
    torch.testing.assert_close(conv_box.flatten(1), out_conv * box / box.sum(1, keepdim=True), rtol=1e-4, atol=1e-5)
    assert expected_box.shape == conv_box.flatten(1).shape


def test_lrp_folds_batchnorm_and_splits_residual_additions() -> None:
    """The residual model with batch norm equals, under LRP, its hand-folded copy without it.

    float64: folding changes float32 rounding, which the gamma rule amplifies (see the batch test).
    """
    model = build(ResidualNet, "reused").double()
    folded = build(ResidualNet, "reused", norm=False).double()
    pairs = ((model.stem, model.bn0, folded.stem), (model.conv1, model.bn1, folded.conv1))
    for conv, bn, target in (*pairs, (model.conv2, model.bn2, folded.conv2)):
        target.load_state_dict(fuse_conv_bn_eval(conv, bn).state_dict())
    folded.fc.load_state_dict(model.fc.state_dict())
    x = images().double()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)
    for composite in ("epsilon", "epsilon_gamma_box", "epsilon_plus"):
        ours = LRP(composite=composite).explain(model, x, TARGETS)
        torch.testing.assert_close(ours, LRP(composite=composite).explain(folded, x, TARGETS), rtol=1e-6, atol=1e-9)


# --- batch contract, determinism, model left as found --------------------------------------------

EXPLAINERS: dict[str, Callable[[], Any]] = {
    "saliency": Saliency,
    "input_x_gradient": InputXGradient,
    "integrated_gradients": lambda: IntegratedGradients(steps=8, internal_batch_size=5),
    "smoothgrad": lambda: SmoothGrad(Saliency(), samples=5, internal_batch_size=7, seed=2),
    "smoothgrad_ig": lambda: SmoothGrad(IntegratedGradients(steps=4), samples=3),
    "guided_backprop": GuidedBackprop,
    "deconvnet": Deconvnet,
    "deeplift": DeepLift,
    "lrp": LRP,
    "lrp_box": lambda: LRP(composite="epsilon_gamma_box"),
}


@pytest.mark.parametrize("kind", ["densenet", "residual", "functional"])
@pytest.mark.parametrize("method", EXPLAINERS)
def test_batch_equals_single_runs(method: str, kind: str) -> None:
    model, x, explainer = MODELS[kind](), images(), EXPLAINERS[method]()
    if method == "lrp_box":
        # The gamma rule divides by sums that nearly cancel at a few positions behind the residual
        # addition, where the convolutions' float32 rounding, which differs between batch sizes
        # (~1e-7), grows to ~1e-4. In float64 batch and single runs agree to the last bit.
        model, x = model.double(), x.double()
    batched = explainer.explain(model, x, TARGETS)
    assert batched.shape == (4, SIZE, SIZE) and batched.dtype == torch.float32
    singles = torch.cat([explainer.explain(model, x[i : i + 1], [t]) for i, t in enumerate(TARGETS)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-5 * max(1.0, float(singles.abs().max())))


@pytest.mark.parametrize("method", EXPLAINERS)
def test_deterministic(method: str) -> None:
    model, x = MODELS["densenet"](), images()
    assert torch.equal(EXPLAINERS[method]().explain(model, x, TARGETS), EXPLAINERS[method]().explain(model, x, TARGETS))


def test_smoothgrad_seed_changes_the_noise() -> None:
    model, x = MODELS["seq"](), images(2)
    a, b = (SmoothGrad(Saliency(), samples=3, seed=seed).explain(model, x, [0, 1]) for seed in (0, 1))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("method", EXPLAINERS)
def test_model_left_as_found(method: str) -> None:
    model, x = MODELS["densenet"](), images()
    with left_as_found(model, x, frozen=model.stem[0].weight, eval_part=model.fc):
        EXPLAINERS[method]().explain(model, x, TARGETS)
    assert function_modes() == 0


@pytest.mark.parametrize("method", EXPLAINERS)
def test_hooks_and_mode_released_after_exception_in_forward(method: str) -> None:
    model = MODELS["densenet"]()
    boom = Boom()
    model.layers[1].append(boom)  # after ReLUs have run: the ReLU override is active when it raises
    model.train()
    boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        EXPLAINERS[method]().explain(model, images(2), [0, 1])
    assert hook_count(model) == 0 and function_modes() == 0
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_works_under_no_grad_and_inference_mode() -> None:
    model, x = MODELS["residual"](), images(2)
    for method in ("saliency", "integrated_gradients", "guided_backprop", "deeplift", "lrp"):
        expected = EXPLAINERS[method]().explain(model, x, [0, 1])
        with torch.no_grad():
            torch.testing.assert_close(EXPLAINERS[method]().explain(model, x, [0, 1]), expected)
        with torch.inference_mode():
            torch.testing.assert_close(EXPLAINERS[method]().explain(model, x.clone(), [0, 1]), expected)


def test_integrated_gradients_bounded_internal_batches() -> None:
    """Never more than internal_batch_size inputs per pass; the result does not depend on it."""
    model, x = MODELS["seq"](), images()
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        small = IntegratedGradients(steps=10, internal_batch_size=7).explain(model, x, TARGETS)
    finally:
        handle.remove()
    assert max(seen) <= 7 and sum(seen) == 4 * 10
    large = IntegratedGradients(steps=10, internal_batch_size=1000).explain(model, x, TARGETS)
    torch.testing.assert_close(small, large, rtol=0, atol=1e-5)


def test_guided_backprop_on_inplace_relu_equals_out_of_place() -> None:
    x = images()
    inplace, plain = build(DenseNetLike, True), build(DenseNetLike, False)
    for explainer in (GuidedBackprop(), Deconvnet(), DeepLift(), LRP()):
        torch.testing.assert_close(explainer.explain(inplace, x, TARGETS), explainer.explain(plain, x, TARGETS))


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(set(EXPLAINERS) - {"smoothgrad_ig", "lrp_box"}))
def test_onnx_only_runner_is_refused(
    method: str, demo: tuple[DeployedModel, nn.Module, torch.Tensor, list[int]]
) -> None:
    deployed, _, x, targets = demo
    assert deployed.forward_runner.torch_module is None
    explainer = EXPLAINERS[method]()
    with pytest.raises(ExplainerError, match=f"{explainer.name} needs gradients"):
        explainer.explain(deployed.forward_runner, x, targets)


def test_torchscript() -> None:
    """Plain gradients run on TorchScript; ReLU overrides and graph propagation need eager modules."""
    model, x = MODELS["seq"](), images(2)
    scripted = torch.jit.script(model)
    for explainer in (Saliency(), IntegratedGradients(steps=4)):
        torch.testing.assert_close(explainer.explain(scripted, x, [0, 1]), explainer.explain(model, x, [0, 1]))
    for explainer in (GuidedBackprop(), Deconvnet(), DeepLift(), LRP()):
        with pytest.raises(ExplainerError, match="TorchScript"):
            explainer.explain(scripted, x, [0, 1])


class Gated(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = activation
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


class Product(Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc((h * torch.sigmoid(h)).mean(dim=(2, 3)))


class DataDependent(Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if h.sum() > 0:
            h = -h
        return self.fc(h.mean(dim=(2, 3)))


class AliasedInplace(Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        F.relu(h, inplace=True)  # the result is used through the alias h
        return self.fc(h.mean(dim=(2, 3)))


def test_propagation_errors_name_the_layer() -> None:
    x = images(1)
    with pytest.raises(ExplainerError, match=r"lrp has no rule for layer 'act' \(GELU\)"):
        LRP().explain(Gated(nn.GELU()).eval(), x, [0])
    DeepLift().explain(Gated(nn.GELU()).eval(), x, [0])  # element-wise: the rescale rule applies
    for explainer in (DeepLift(), LRP()):
        with pytest.raises(ExplainerError, match=r"does not support layer 'act' \(Hardswish\)"):
            explainer.explain(Gated(nn.Hardswish()).eval(), x, [0])
        with pytest.raises(ExplainerError, match="function mul .* only as scaling of one activation"):
            explainer.explain(Product(nn.Identity()).eval(), x, [0])
        with pytest.raises(ExplainerError, match="torch.fx can trace"):
            explainer.explain(DataDependent(nn.Identity()).eval(), x, [0])
        with pytest.raises(ExplainerError, match="does not reproduce its output"):
            explainer.explain(AliasedInplace(nn.Identity()).eval(), x, [0])
        batchnorm_without_stats = Gated(nn.BatchNorm2d(4, track_running_stats=False)).eval()
        with pytest.raises(ExplainerError, match="without running statistics"):
            explainer.explain(batchnorm_without_stats, x, [0])


#: SmoothGrad as a node configuration builds it: the base named, with its settings in base_params.
SMOOTHGRAD_FROM_CONFIG = functools.partial(get_explainer, "smoothgrad")


@pytest.mark.parametrize(
    ("cls", "params", "message"),
    [
        (Saliency, {"absolute": 1}, "absolute must be True or False, got 1"),
        (IntegratedGradients, {"steps": 0}, "steps must be a positive integer, got 0"),
        (IntegratedGradients, {"steps": 2.5}, "steps must be a positive integer, got 2.5"),
        (IntegratedGradients, {"baseline": float("inf")}, "baseline must be a finite number, got inf"),
        (IntegratedGradients, {"baseline": "blur"}, "baseline must be a finite number, got 'blur'"),
        (IntegratedGradients, {"method": "simpson"}, "method must be one of .*, got 'simpson'"),
        (IntegratedGradients, {"internal_batch_size": -4}, "internal_batch_size must be a positive integer, got -4"),
        (IntegratedGradients, {"steps": 1, "method": "riemann_trapezoid"}, "steps must be >= 2 for riemann_trapezoid"),
        (SMOOTHGRAD_FROM_CONFIG, {"samples": 0}, "samples must be a positive integer, got 0"),
        (SMOOTHGRAD_FROM_CONFIG, {"noise_level": -0.1}, "noise_level must be >= 0, got -0.1"),
        (SMOOTHGRAD_FROM_CONFIG, {"variant": "smoothgrad_cubed"}, "variant must be one of .*, got 'smoothgrad_cubed'"),
        (SMOOTHGRAD_FROM_CONFIG, {"seed": -1}, "seed must be an integer >= 0, got -1"),
        (SMOOTHGRAD_FROM_CONFIG, {"seed": True}, "seed must be an integer >= 0, got True"),
        (
            SMOOTHGRAD_FROM_CONFIG,
            {"base": "occlusion"},
            "base must name a method that attributes to the input pixels.*'occlusion'",
        ),
        (SMOOTHGRAD_FROM_CONFIG, {"base": "smoothgrad"}, "base must name a method .*got 'smoothgrad'"),
        (SMOOTHGRAD_FROM_CONFIG, {"base": "nope"}, "unknown explainer 'nope'"),
        (
            SMOOTHGRAD_FROM_CONFIG,
            {"base_params": {"steps": 0}, "base": "integrated_gradients"},
            "steps must be a positive integer",
        ),
        (
            SMOOTHGRAD_FROM_CONFIG,
            {"base_params": {"bogus": 1}},
            "unknown setting\\(s\\) 'bogus' for explainer 'saliency'",
        ),
        (SMOOTHGRAD_FROM_CONFIG, {"base_params": [1]}, r"base_params must be a mapping of settings, got \[1\]"),
        (DeepLift, {"baseline": None}, "baseline must be a finite number, got None"),
        (LRP, {"composite": "epsilon_gamma"}, "composite must be one of .*, got 'epsilon_gamma'"),
        (LRP, {"epsilon": 0.0}, "epsilon must be > 0, got 0.0"),
        (LRP, {"gamma": -1.0}, "gamma must be >= 0, got -1.0"),
        (LRP, {"alpha": 2.0, "beta": 0.5}, "alpha - beta must be 1 .*got alpha=2.0, beta=0.5"),
        (LRP, {"low": 1.0, "high": 1.0}, "low must be below high, got low=1.0, high=1.0"),
        (LRP, {"low": "min"}, "low must be a finite number, got 'min'"),
    ],
)
def test_bad_settings(cls: type, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ExplainerError, match=message):
        cls(**params)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "guided_backprop", "deeplift", "lrp"])
def test_target_errors(method: str) -> None:
    model, explainer = MODELS["seq"](), EXPLAINERS[method]()
    with pytest.raises(ExplainerError, match="batch has 2 samples, got 3 targets"):
        explainer.explain(model, images(2), [0, 1, 2])
    with pytest.raises(ExplainerError, match=r"targets \[0, 3\] out of range for a model with 3 classes"):
        explainer.explain(model, images(2), [0, 3])


def test_completeness_error_only_where_an_axiom_holds() -> None:
    with pytest.raises(ExplainerError, match="saliency satisfies no completeness axiom"):
        Saliency().explain_with_delta(MODELS["seq"](), images(1), [0])


# --- registry -----------------------------------------------------------------------------------


def test_registry() -> None:
    names = {
        "saliency": Saliency,
        "input_x_gradient": InputXGradient,
        "integrated_gradients": IntegratedGradients,
        "smoothgrad": SmoothGrad,
        "guided_backprop": GuidedBackprop,
        "deconvnet": Deconvnet,
        "deeplift": DeepLift,
        "lrp": LRP,
    }
    assert set(names) <= set(available_explainers())
    for name, cls in names.items():
        explainer = get_explainer(name)
        assert isinstance(explainer, cls) and explainer.needs_gradients
    explainer = get_explainer("smoothgrad", base="deeplift", base_params={"baseline": 0.5}, samples=2)
    assert isinstance(explainer, SmoothGrad) and explainer.base_explainer.baseline == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, x = MODELS["seq"](), images(2)
        assert explainer.explain(model, x, [0, 1]).shape == (2, SIZE, SIZE)


@pytest.mark.parametrize("kind", ["seq", "densenet", "residual", "functional"])
def test_integrated_gradients_completeness_within_one_percent_at_64_steps(kind: str) -> None:
    """The issue's axiom at its setting (64 Gauss-Legendre nodes, zero baseline) on the small
    models; the demo model's sharper integrand needs 128 nodes for 1% (test above)."""
    model, x = MODELS[kind](), images()
    maps, delta = IntegratedGradients(steps=64).explain_with_delta(model, x, TARGETS)
    difference = target_logits(model, x, TARGETS) - target_logits(model, torch.zeros_like(x), TARGETS)
    assert (difference.abs() > 1e-3).all(), "a zero difference would make the bound say nothing"
    completeness_error = (maps.double().sum(dim=(1, 2)) - difference).abs()
    assert (completeness_error <= 0.01 * difference.abs()).all(), (completeness_error / difference.abs()).tolist()
