"""CAM, Grad-CAM++, Score-CAM, guided Grad-CAM, RISE, HiPe, LIME and KernelSHAP.

Independent references at matched settings (pytorch-grad-cam, Captum, a numpy RISE, exact
Shapley values by enumeration), localisation on held-out phantom nodules with the shipped demo
model, and the explainer contract (batch = single runs, determinism, ONNX runners, model left
as found, clear errors, validated settings).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import GuidedGradCam as CaptumGuidedGradCam
from captum.attr import KernelShap as CaptumKernelShap
from captum.attr import Lime as CaptumLime
from skimage.transform import resize
from torch import nn

from dicom_io.pixels import prepare_frames
from service.explain.base import CHUNK_SIZE_CPU, CHUNK_SIZE_GPU, Explainer, ExplainerError, chunk_size_for
from service.explain.hooks import resolve_module
from service.explain.methods.cam import CAM, GradCAM, GradCAMPlusPlus, GuidedGradCAM, ScoreCAM
from service.explain.methods.perturbation import RISE, HiPe
from service.explain.methods.surrogate import KernelShap, Lime
from service.explain.registry import available_explainers, get_explainer
from service.inference.deployed import DeployedModel
from service.models import demo_card_path
from tests.helpers import grad_cam_module, held_out_nodules
from tests.unit.service.explain.explainer_checks import left_as_found
from tests.unit.service.explain.test_explainers_core import (
    MODELS,
    SIZE,
    TARGETS,
    Boom,
    OnnxRunner,
    SeqNet,
    build,
    hook_count,
    images,
    onnx_runner,  # noqa: F401  (a fixture)
    pearson,
    predicted,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning",
    "ignore::DeprecationWarning:pytorch_grad_cam",
)

#: Training used seeds 7 and 1007; these phantoms were never seen.
NODULES = 20


# --- pytorch-grad-cam (imported behind the shim in tests/helpers.py) -------------------------------


def grad_cam_reference(method: str, model: nn.Module, layer: str, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    module = grad_cam_module()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(module, method)(model, [resolve_module(model, layer)])
    try:
        return torch.from_numpy(cam(x, [ClassifierOutputTarget(t) for t in targets]))
    finally:
        cam.activations_and_grads.release()


# --- models ------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN - in-place ReLU - conv, concatenated to its input (DenseNet's layer)."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], dim=1)


class DenseNetLike(nn.Module):
    """Two dense blocks and a transition, DenseNet's final BN + in-place ReLU, GAP, linear.

    ``features`` (post-ReLU, 16 x 16 at a 64 x 64 input) is the CAM layer.
    """

    target = "features"

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False),
            DenseLayer(8, 8),
            DenseLayer(16, 8),
            nn.BatchNorm2d(24),
            nn.ReLU(inplace=True),
            nn.Conv2d(24, 16, 1, bias=False),
            nn.AvgPool2d(2),
            DenseLayer(16, 8),
            DenseLayer(24, 8),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class FlattenHead(nn.Module):
    """Conv features flattened into a linear layer: no global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, stride=4, padding=1), nn.ReLU())
        self.classifier = nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class SquashedHead(nn.Module):
    """GAP + linear, then a tanh: the linear layer no longer gives the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FiveRegions(nn.Module):
    """A non-linear model of five image regions (interactions included), for exact Shapley values."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.linear = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        interaction = x[:, 0, :2, :2].sum(dim=(1, 2)) * x[:, 0, 5:, 5:].sum(dim=(1, 2))
        return self.linear(torch.tanh(self.conv(x)).flatten(1)) + interaction[:, None]


def five_region_mask() -> torch.Tensor:
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[:4, 4:] = 1
    mask[4:, :4] = 2
    mask[4:, 4:6] = 3
    mask[4:, 6:] = 4
    return mask


def exact_shapley(model: nn.Module, x: torch.Tensor, target: int, mask: torch.Tensor) -> torch.Tensor:
    """Shapley values of the regions of ``mask`` (switched off = 0) by enumerating all coalitions."""
    count = int(mask.max()) + 1
    coalitions = list(itertools.chain.from_iterable(itertools.combinations(range(count), k) for k in range(count + 1)))
    keep = torch.stack([torch.isin(mask, torch.tensor(c, dtype=torch.long)) for c in coalitions])
    with torch.no_grad():
        values = model(torch.where(keep[:, None], x, 0.0))[:, target].double()
    value = dict(zip(coalitions, values.tolist()))
    phi = torch.zeros(count, dtype=torch.float64)
    for feature in range(count):
        for coalition in coalitions:
            if feature in coalition:
                continue
            size = len(coalition)
            weight = math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
            with_feature = tuple(sorted((*coalition, feature)))
            phi[feature] += weight * (value[with_feature] - value[coalition])
    return phi


def per_feature(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The value painted on each feature of ``mask`` (``[B, H, W]`` maps -> ``[B, M]``)."""
    count = int(mask.max()) + 1
    return torch.stack([torch.stack([m[mask == j][0] for j in range(count)]) for m in maps]).double()


# --- the demo model and held-out phantom nodules ---------------------------------------------------------


class Phantoms:
    """The shipped demo model and NODULES held-out nodule phantoms, prepared as the node does."""

    def __init__(self) -> None:
        self.model = DeployedModel.from_card_path(demo_card_path())
        card = self.model.card
        self.nodule = card.output.classes.index("nodule")
        self.target_layer = card.target_layer
        #: The card's black (stored value 0 after windowing) in normalised units.
        self.black = float((0.0 - card.input.mean[0]) / card.input.std[0])
        self.phantoms = held_out_nodules(NODULES)
        self.frames = [prepare_frames(p.dataset, card.input.spec())[0] for p in self.phantoms]
        self.batch = torch.from_numpy(self.model.normalise(np.stack([f.model_input for f in self.frames])))
        self.targets = [self.nodule] * NODULES
        self._maps: dict[str, tuple[torch.Tensor, list[int] | None]] = {}

    @property
    def torch_module(self) -> nn.Module:
        return self.model.model_for(needs_gradients=True)  # type: ignore[return-value]

    def maps(self, method: str) -> tuple[torch.Tensor, list[int] | None]:
        """The method's maps on all phantoms (computed once) and, for HiPe, its forward passes."""
        if method not in self._maps:
            explainer = get_explainer(method, **LOCALISATION[method](self))
            model = self.model.model_for(needs_gradients=explainer.needs_gradients)
            if isinstance(explainer, HiPe):
                self._maps[method] = explainer.explain_with_passes(model, self.batch, self.targets)
            else:
                self._maps[method] = (explainer.explain(model, self.batch, self.targets), None)
        return self._maps[method]

    def hits(self, maps: torch.Tensor) -> int:
        """Pointing game: in how many phantoms the map's peak (on the source grid) is in the nodule."""
        hits = 0
        for phantom, frame, saliency in zip(self.phantoms, self.frames, maps.numpy()):
            source_map = frame.mapping.to_source_grid(saliency)
            peak = np.unravel_index(np.argmax(source_map), source_map.shape)
            hits += bool(phantom.lesion_mask[peak])
        return hits

    def deletion_auc(self, maps: torch.Tensor, fraction: float = 1.0, steps: int = 16) -> float:
        """Deletion (Petsiuk et al.): the most salient pixels go black first, ``fraction`` of the image
        in ``steps`` equal steps; the mean over phantoms of the area under p(nodule), per unit of
        the deleted fraction (lower is better). Ties keep raster order."""
        batch = self.batch
        n_images, _, height, width = batch.shape
        order = maps.reshape(n_images, -1).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(height * width).expand(n_images, -1))
        curves = []
        for step in range(steps + 1):
            removed = (rank < int(step * fraction * height * width) // steps).view(n_images, 1, height, width)
            inputs = torch.where(removed, self.black, batch).numpy()
            logits = torch.from_numpy(self.model.forward_runner.forward(inputs))
            curves.append(torch.softmax(logits, dim=1)[:, self.nodule])
        curve = torch.stack(curves, dim=1).double()
        return float(torch.trapezoid(curve, dx=1 / steps, dim=1).mean())


@pytest.fixture(scope="module")
def demo() -> Phantoms:
    return Phantoms()


#: Settings per method for the phantoms. Perturbations use the card's black: normalised 0 is
#: mid-grey here, and grey patches raise the demo model's nodule score (occlusion with 0 finds
#: drops almost only where there is no nodule).
LOCALISATION: dict[str, Callable[[Phantoms], dict[str, object]]] = {
    "gradcam_pp": lambda d: {"target_layer": d.target_layer},
    # The authors' code (no baseline subtraction): with it the all-black image's nodule score,
    # subtracted from every channel, makes the weights of most channels negative on this model.
    "scorecam": lambda d: {"target_layer": d.target_layer, "baseline": d.black, "subtract_baseline": False},
    "hipe": lambda d: {"baseline": d.black},
    # With the paper's probability score every half-masked phantom is "effusion" to the demo model
    # (p(nodule) ~ 1e-4 whatever is kept): no signal. The logit still varies; cells of 23 pixels
    # (cell_size 10) suit the nodules; centring removes the mask-coverage noise, which otherwise
    # hides the nodule at this mask count (1 of 20 found uncentred).
    "rise": lambda d: {
        "masks": RISE_MASKS,
        "cell_size": 10,
        "baseline": d.black,
        "score": "logit",
        "centred": True,
        "chunk_size": 100,
    },
}
#: RISE's masks in the localisation test: 4,000 (the default) would take minutes on two cores.
RISE_MASKS = 1000


# --- references: pytorch-grad-cam -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["demo", "densenet"])
def reference_case(request: pytest.FixtureRequest, demo: Phantoms) -> tuple[nn.Module, str, torch.Tensor, list[int]]:
    """A model, its CAM layer, images and the predicted classes."""
    if request.param == "demo":
        model, layer, x = demo.torch_module, demo.target_layer, demo.batch[:3]
    else:
        model, layer, x = build(DenseNetLike), DenseNetLike.target, images()
    return model, layer, x, predicted(model, x)


def normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each map min-max scaled to [0, 1], as pytorch-grad-cam returns them."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low + 1e-7)).view_as(maps)


def test_gradcam_pp_matches_pytorch_grad_cam(reference_case: tuple[nn.Module, str, torch.Tensor, list[int]]) -> None:
    model, layer, x, targets = reference_case
    ours = GradCAMPlusPlus(target_layer=layer).explain(model, x, targets)
    theirs = grad_cam_reference("GradCAMPlusPlus", model, layer, x, targets)
    for sample, (mine, reference) in enumerate(zip(ours, theirs)):
        assert pearson(mine, reference) >= 0.99, f"sample {sample}"
    torch.testing.assert_close(normalised(ours), theirs, rtol=0, atol=1e-3)


def test_scorecam_matches_pytorch_grad_cam(reference_case: tuple[nn.Module, str, torch.Tensor, list[int]]) -> None:
    """pytorch-grad-cam's variant: logits, softmax over channels (which cancels any baseline).

    It upsamples the masks with ``align_corners=True`` where ours (and the authors' code) use
    ``False``: close, not identical.
    """
    model, layer, x, targets = reference_case
    ours = ScoreCAM(target_layer=layer, score="logit", channel_softmax=True).explain(model, x, targets)
    theirs = grad_cam_reference("ScoreCAM", model, layer, x, targets)
    for sample, (mine, reference) in enumerate(zip(ours, theirs)):
        assert pearson(mine, reference) >= 0.99, f"sample {sample}"
    torch.testing.assert_close(normalised(ours), theirs, rtol=0, atol=0.1)


def test_guided_gradcam_matches_captum(reference_case: tuple[nn.Module, str, torch.Tensor, list[int]]) -> None:
    model, layer, x, targets = reference_case
    ours = GuidedGradCAM(target_layer=layer).explain(model, x, targets)
    captum = CaptumGuidedGradCam(model, resolve_module(model, layer))
    theirs = captum.attribute(x, target=targets, interpolate_mode="bilinear").sum(dim=1).detach()
    for sample, (mine, reference) in enumerate(zip(ours, theirs)):
        assert pearson(mine, reference) >= 0.99, f"sample {sample}"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * float(theirs.abs().max()))


# --- CAM --------------------------------------------------------------------------------------------------


def test_cam_equals_the_demo_models_own_class_activation_maps(demo: Phantoms) -> None:
    """DemoNet computes its CAMs itself (the training loss uses them): an independent reference."""
    module, x = demo.torch_module, demo.batch[:4]
    targets = [0, 1, 2, 1]
    ours = CAM(target_layer=demo.target_layer, relu=False).explain(module, x, targets)
    with torch.no_grad():
        _, cams = module.logits_and_cams(x)
    own = cams[torch.arange(4), torch.tensor(targets)][:, None]
    reference = torch.nn.functional.interpolate(own, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize("kind", ["densenet", "seq", "inplace"])
def test_cam_is_grad_cam_times_feature_cells_on_a_gap_head(kind: str) -> None:
    """For GAP + linear, Grad-CAM's weights are W[c] / (h w): CAM = h w Grad-CAM, exactly."""
    model = build(DenseNetLike) if kind == "densenet" else MODELS[kind]()
    layer = "features"
    x = images()
    cells = 16 * 16
    cam = CAM(target_layer=layer, relu=False).explain(model, x, TARGETS)
    gradcam = GradCAM(target_layer=layer, relu=False).explain(model, x, TARGETS)
    torch.testing.assert_close(cam, cells * gradcam, rtol=1e-4, atol=1e-5 * float(cam.abs().max()))
    named = CAM(target_layer=layer, relu=False, classifier="classifier" if kind == "densenet" else "head.2")
    torch.testing.assert_close(named.explain(model, x, TARGETS), cam)


@pytest.mark.parametrize(
    ("model", "layer", "message"),
    [
        (FlattenHead, "features", r"ends in Linear 'classifier' \(the input of the layer that gives the logits is not"),
        (SquashedHead, "features", r"ends in Tanh 'head\.3' \(no nn\.Linear layer gives the logits\)"),
        (
            SeqNet,
            "features.4",
            r"ends in Linear 'head\.2' \(.* not the global average of features\.4\)",
        ),  # ReLU after it
    ],
)
def test_cam_needs_a_gap_linear_head(model: Callable[[], nn.Module], layer: str, message: str) -> None:
    with pytest.raises(ExplainerError, match="cam needs a global-average-pool \\+ linear head; this model " + message):
        CAM(target_layer=layer).explain(build(model), images(1), [0])


def test_cam_classifier_must_be_a_linear_layer() -> None:
    with pytest.raises(ExplainerError, match="classifier 'head.1' is a Flatten, not an nn.Linear"):
        CAM(target_layer="features", classifier="head.1").explain(MODELS["seq"](), images(1), [0])
    with pytest.raises(ExplainerError, match="unknown classifier 'fc'"):
        CAM(target_layer="features", classifier="fc").explain(MODELS["seq"](), images(1), [0])


# --- Score-CAM ------------------------------------------------------------------------------------------


def test_scorecam_constant_channels_give_zero_masks_not_nan() -> None:
    model, x = MODELS["seq"](), images(2)
    conv = model.features[4]
    with torch.no_grad():
        conv.weight[:4] = 0  # channels 0-3: constant (their bias) everywhere
    maps = ScoreCAM(target_layer="features.4", relu=False).explain(model, x, [0, 1])
    assert torch.isfinite(maps).all()
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()  # every channel constant: every weight is f(baseline) - f(baseline) = 0
    maps = ScoreCAM(target_layer="features.4", relu=False).explain(model, x, [0, 1])
    assert torch.equal(maps, torch.zeros_like(maps))


# --- references: Captum LIME and KernelSHAP ---------------------------------------------------------------


def lime_kernel(width: float) -> Callable[..., torch.Tensor]:
    """LIME's weight, on the interpretable sample, as a Captum ``similarity_func``."""

    def similarity(original: object, perturbed: object, sample: torch.Tensor, **kwargs: object) -> torch.Tensor:
        kept, count = float(sample.sum()), sample.numel()
        distance = 1 - kept / (math.sqrt(kept) * math.sqrt(count)) if kept > 0 else 1.0
        return torch.tensor(math.exp(-(distance**2) / (2 * width**2)))

    return similarity


def replay(rows: torch.Tensor) -> Callable[..., Iterator[torch.Tensor]]:
    """A Captum ``perturb_func`` that yields the given coalitions in order."""

    def generator(original: object, **kwargs: object) -> Iterator[torch.Tensor]:
        for row in rows:
            yield row[None].long()

    return generator


@pytest.fixture(scope="module", params=["demo", "densenet"])
def surrogate_case(request: pytest.FixtureRequest, demo: Phantoms) -> tuple[nn.Module, torch.Tensor, int]:
    if request.param == "demo":
        return demo.torch_module, demo.batch[:1], demo.nodule
    return build(DenseNetLike), images(1), 1


def test_lime_matches_captum_on_the_same_samples(surrogate_case: tuple[nn.Module, torch.Tensor, int]) -> None:
    """Same superpixels, coalitions, kernel and ridge: Captum's Lime (scikit-learn's Ridge) agrees."""
    model, x, target = surrogate_case
    lime = Lime(samples=150, n_segments=20, score="logit")
    segments = lime.segment(x)
    ours = lime.explain(model, x, [target])
    z, _ = lime.coalitions(int(segments.max()) + 1)
    captum = CaptumLime(
        model,
        interpretable_model=SkLearnRidge(alpha=lime.alpha),
        similarity_func=lime_kernel(lime.kernel_width),
        perturb_func=replay(z),
    )
    theirs = captum.attribute(x, target=target, feature_mask=segments[:, None], n_samples=len(z))[:, 0].detach()
    assert pearson(ours, theirs) >= 0.99
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-4 * float(theirs.abs().max()))


@pytest.mark.slow
def test_kernel_shap_matches_captum_on_the_same_samples(surrogate_case: tuple[nn.Module, torch.Tensor, int]) -> None:
    """All coalitions of 8 superpixels with their Shapley-kernel weights, fed to Captum's KernelShap.

    Captum imposes the end points with weight 1e6 where ours eliminates a variable: equal to ~1e-5.
    """
    model, x, target = surrogate_case
    segments = KernelShap(n_segments=8).segment(x)
    count = int(segments.max()) + 1
    shap = KernelShap(samples=2**count - 2, n_segments=8)
    ours = shap.explain(model, x, [target])
    z, weights = shap.coalitions(count)
    assert len(z) == 2**count  # both end points, then every other coalition
    kernel = {tuple(row.long().tolist()): float(w) for row, w in zip(z, weights)}

    def similarity(original: object, perturbed: object, sample: torch.Tensor, **kwargs: object) -> torch.Tensor:
        kept = int(sample.sum())
        return torch.tensor(1e6 if kept in (0, count) else kernel[tuple(sample[0].long().tolist())])

    captum = CaptumKernelShap(model)
    captum.perturb_func = replay(z)
    captum.similarity_func = similarity
    theirs = captum.attribute(x, target=target, feature_mask=segments[:, None], n_samples=len(z))[:, 0].detach()
    assert pearson(ours, theirs) >= 0.99
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-3 * float(theirs.abs().max()))


def test_kernel_shap_equals_exact_shapley_values_and_captum() -> None:
    """5 features, samples >= 2^5 - 2: every coalition, so the exact Shapley values; Captum's own
    sampler (2,000 draws, seeded) converges to them."""
    model, mask = FiveRegions().eval(), five_region_mask()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    targets = [0, 2]
    ours = KernelShap(samples=30).explain(model, x, targets, feature_mask=mask)
    exact = torch.stack([exact_shapley(model, x[b], t, mask) for b, t in enumerate(targets)])
    torch.testing.assert_close(per_feature(ours, mask), exact, rtol=0, atol=1e-5)
    # efficiency: the values add up to f(x) - f(all off)
    with torch.no_grad():
        total = model(x)[[0, 1], targets] - model(torch.zeros_like(x))[[0, 1], targets]
    torch.testing.assert_close(exact.sum(dim=1), total.double(), rtol=0, atol=1e-5)
    torch.manual_seed(0)
    captum = CaptumKernelShap(model).attribute(x[:1], target=0, feature_mask=mask[None, None], n_samples=2000)
    assert pearson(ours[0], captum[0, 0]) >= 0.99
    torch.testing.assert_close(
        per_feature(captum[:, 0], mask)[0], exact[0], rtol=0, atol=0.05 * float(exact.abs().max())
    )


def test_kernel_shap_sampling_approaches_the_exact_values() -> None:
    """Below 2^M - 2 samples coalitions are drawn; efficiency still holds exactly."""
    model, mask = FiveRegions().eval(), five_region_mask()
    mask[:4, :2] = 5  # six features: 62 coalitions besides the end points
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    shap = KernelShap(samples=50, seed=1)
    z, weights = shap.coalitions(6)
    assert len(z) == 52 and torch.equal(weights[2:], torch.ones(50, dtype=torch.float64))
    estimate = per_feature(shap.explain(model, x, [0], feature_mask=mask), mask)[0]
    exact = exact_shapley(model, x[0], 0, mask)
    assert float(estimate.sum()) == pytest.approx(float(exact.sum()), abs=1e-5)
    assert pearson(estimate, exact) >= 0.9
    assert len(KernelShap(samples=62).coalitions(6)[0]) == 64  # enough samples: enumerated


# --- RISE against an independent implementation -----------------------------------------------------------


def petsiuk_masks(grids: np.ndarray, shifts: np.ndarray, height: int, width: int) -> np.ndarray:
    """The authors' mask generator (RISE's ``generate_masks``) on given random draws."""
    count, cells, _ = grids.shape
    cell = np.ceil(np.array([height, width]) / cells).astype(int)
    up_size = (cells + 1) * cell
    masks = np.empty((count, height, width))
    for i in range(count):
        y, x = shifts[i]
        upsampled = resize(grids[i], up_size, order=1, mode="reflect", anti_aliasing=False)
        masks[i] = upsampled[y : y + height, x : x + width]
    return masks


@pytest.mark.parametrize(("height", "width", "cells"), [(64, 64, 7), (50, 70, 5)])
def test_rise_masks_are_the_authors_masks(height: int, width: int, cells: int) -> None:
    rise = RISE(masks=40, cell_size=cells, probability=0.3, seed=4)
    grids, shifts = rise.grids(height, width)
    assert set(grids.unique().tolist()) <= {0.0, 1.0}
    expected = petsiuk_masks(grids.numpy(), shifts.numpy(), height, width)
    np.testing.assert_allclose(rise.masks(height, width).numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("centred", [False, True])
def test_rise_matches_a_numpy_implementation(centred: bool) -> None:
    """Same masks; scores and the weighted sum computed in numpy, one masked image at a time."""
    model, x = MODELS["seq"](), images(2)
    rise = RISE(masks=48, cell_size=5, probability=0.4, seed=2, baseline=-0.5, chunk_size=20, centred=centred)
    ours = rise.explain(model, x, [0, 2])
    masks = rise.masks(SIZE, SIZE).numpy().astype(np.float64)
    for sample, target in enumerate([0, 2]):
        image = x[sample].numpy().astype(np.float64)
        scores = []
        for mask in masks:
            masked = torch.from_numpy((mask * image + (1 - mask) * -0.5)[None].astype(np.float32))
            with torch.no_grad():
                logits = model(masked)[0].double().numpy()
            probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            scores.append(probabilities[target])
        scores = np.array(scores)
        if centred:
            scores = scores - scores.mean()
        expected = np.einsum("n,nhw->hw", scores, masks) / (len(masks) * 0.4)
        np.testing.assert_allclose(ours[sample].numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


# --- HiPe --------------------------------------------------------------------------------------------------


class Region(nn.Module):
    """Logits that read the mean of one rectangle: the only salient region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x[:, 0, 40:50, 10:20].mean(dim=(1, 2))
        return torch.stack([score, -score], dim=1)


class Constant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 2) + 0 * x.sum()


def test_hipe_refines_only_salient_windows() -> None:
    hipe = HiPe(score="logit", min_window=4)
    x = torch.ones(1, 1, 64, 96)
    assert hipe.levels(64, 96) == [8, 16, 32]  # windows of 16, 8 and 4 pixels on the short side
    assert HiPe().levels(224, 224) == [8, 16, 32, 64]  # 56 to 7 pixels
    full = 1 + sum((n + 1) ** 2 for n in hipe.levels(64, 96))
    maps, passes = hipe.explain_with_passes(Constant(), x, [0])
    assert passes == [full] and torch.equal(maps, torch.zeros_like(maps))  # nothing salient: all refined
    maps, passes = hipe.explain_with_passes(Region(), x, [0])
    assert passes[0] < full / 3
    peak = divmod(int(maps[0].argmax()), 96)
    assert 40 <= peak[0] < 50 and 10 <= peak[1] < 20
    assert float(maps[0, :30].abs().max()) == 0  # far from the region nothing was found
    torch.testing.assert_close(hipe.explain(Region(), x, [0]), maps)


# --- localisation on held-out phantom nodules ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", list(LOCALISATION))
def test_peak_inside_the_nodule_for_at_least_80_percent(demo: Phantoms, method: str) -> None:
    maps, passes = demo.maps(method)
    rate = demo.hits(maps) / NODULES
    extra = "" if passes is None else f", forward passes per image: mean {np.mean(passes):.0f}, max {max(passes)}"
    print(f"{method} pointing game on {NODULES} held-out nodules: {rate:.0%}{extra}")
    assert rate >= 0.8, f"{method} peak inside the nodule for only {rate:.0%} of {NODULES} held-out phantoms"


@pytest.mark.slow
def test_hipe_needs_ten_times_fewer_passes_than_rise_at_comparable_deletion_auc(demo: Phantoms) -> None:
    """HiPe's passes against RISE's default 4,000 masks; deletion AUC against the RISE of the test.

    The AUCs are compared over the first 10% of the pixels (the nodule and its surroundings). Over
    the whole image HiPe does worse than RISE on this model (printed, not asserted): each coarse
    window that holds the nodule paints the nodule's drop over all of its pixels, so once the nodule
    is gone deletion goes on into that halo, whose blackening raises p(nodule) again.
    """
    hipe_maps, passes = demo.maps("hipe")
    assert passes is not None and max(passes) * 10 <= 4000, f"HiPe used up to {max(passes)} forward passes"
    rise_maps, _ = demo.maps("rise")
    hipe_auc, rise_auc = demo.deletion_auc(hipe_maps, 0.1), demo.deletion_auc(rise_maps, 0.1)
    print(
        f"deletion AUC (lower is better) over the first 10% of pixels: HiPe {hipe_auc:.3f} "
        f"({np.mean(passes):.0f} passes per image), RISE {rise_auc:.3f} ({RISE_MASKS} masks); over all pixels: "
        f"HiPe {demo.deletion_auc(hipe_maps):.3f}, RISE {demo.deletion_auc(rise_maps):.3f}"
    )
    assert hipe_auc <= 1.2 * rise_auc


# --- the contract ------------------------------------------------------------------------------------------

CONTRACT: dict[str, Callable[[], Explainer]] = {
    "cam": lambda: CAM(target_layer="features", relu=False),
    "gradcam_pp": lambda: GradCAMPlusPlus(target_layer="features.4", relu=False),
    "scorecam": lambda: ScoreCAM(target_layer="features.4", relu=False, chunk_size=20),  # 64 masks: mixed chunks
    "guided_gradcam": lambda: GuidedGradCAM(target_layer="features.4", relu=False),
    "rise": lambda: RISE(masks=40, chunk_size=30),
    "hipe": lambda: HiPe(min_window=8, chunk_size=30),  # windows of 16 and 8 pixels
    "lime": lambda: Lime(samples=60, n_segments=10, chunk_size=25),
    "kernel_shap": lambda: KernelShap(samples=60, n_segments=10, chunk_size=25),
}
FORWARD_ONLY = ["rise", "hipe", "lime", "kernel_shap"]
SEEDED = {
    "rise": lambda seed: RISE(masks=40, seed=seed),
    "lime": lambda seed: Lime(samples=60, n_segments=10, seed=seed),
    "kernel_shap": lambda seed: KernelShap(samples=60, n_segments=10, seed=seed),
}


@pytest.mark.parametrize("method", CONTRACT)
def test_batch_equals_single_runs(method: str) -> None:
    model, x, explainer = MODELS["inplace"](), images(), CONTRACT[method]()
    batched = explainer.explain(model, x, TARGETS)
    assert batched.shape == (4, SIZE, SIZE) and batched.dtype == torch.float32
    singles = torch.cat([explainer.explain(model, x[i : i + 1], [t]) for i, t in enumerate(TARGETS)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-4 * float(singles.abs().max()) + 1e-7)


@pytest.mark.parametrize("method", CONTRACT)
def test_deterministic(method: str) -> None:
    model, x, explainer = MODELS["seq"](), images(), CONTRACT[method]()
    assert torch.equal(explainer.explain(model, x, TARGETS), explainer.explain(model, x, TARGETS))


@pytest.mark.parametrize("method", SEEDED)
def test_seed_changes_the_draws(method: str) -> None:
    model, x = MODELS["seq"](), images(2)
    assert not torch.equal(SEEDED[method](0).explain(model, x, [0, 1]), SEEDED[method](1).explain(model, x, [0, 1]))


@pytest.mark.parametrize("method", CONTRACT)
def test_model_left_as_found(method: str) -> None:
    model, x = MODELS["inplace"](), images()
    with left_as_found(model, x, frozen=model.features[0][0].weight, eval_part=model.head):
        CONTRACT[method]().explain(model, x, TARGETS)


@pytest.mark.parametrize("method", CONTRACT)
def test_hooks_and_mode_released_after_exception_in_forward(method: str) -> None:
    model = MODELS["seq"]()
    model.features.append(Boom())
    model.train()
    model.features[-1].armed = True
    with pytest.raises(RuntimeError, match="boom"):
        CONTRACT[method]().explain(model, images(2), [0, 1])
    assert hook_count(model) == 0
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("kind", ["reused", "functional"])
@pytest.mark.parametrize("method", ["gradcam_pp", "scorecam", "rise", "hipe"])
def test_reused_and_functional_relu(kind: str, method: str) -> None:
    model, x = MODELS[kind](), images(2)
    explainer = CONTRACT[method]()
    if hasattr(explainer, "target_layer"):
        explainer.target_layer = model.target
    maps = explainer.explain(model, x, [0, 1])
    assert torch.isfinite(maps).all() and maps.abs().max() > 0


@pytest.mark.parametrize("method", FORWARD_ONLY)
def test_forward_only_methods_run_on_an_onnx_runner(onnx_runner: OnnxRunner, method: str) -> None:  # noqa: F811
    model, x, explainer = MODELS["inplace"](), images(2), CONTRACT[method]()
    expected = explainer.explain(model, x, [0, 1])
    ours = explainer.explain(onnx_runner, x, [0, 1])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("gradcam_pp", "gradcam_pp needs gradients, but the model runs on OnnxRunner"),
        ("guided_gradcam", "guided_gradcam needs gradients, but the model runs on OnnxRunner"),
        ("scorecam", "scorecam needs the activations of a torch module"),
        ("cam", "cam needs the activations of a torch module"),
    ],
)
def test_torch_methods_on_an_onnx_runner(onnx_runner: OnnxRunner, method: str, message: str) -> None:  # noqa: F811
    with pytest.raises(ExplainerError, match=message):
        CONTRACT[method]().explain(onnx_runner, images(1), [0])


@pytest.mark.parametrize("method", CONTRACT)
def test_target_errors(method: str) -> None:
    model, explainer = MODELS["seq"](), CONTRACT[method]()
    with pytest.raises(ExplainerError, match="batch has 2 samples, got 3 targets"):
        explainer.explain(model, images(2), [0, 1, 2])
    with pytest.raises(ExplainerError, match=r"targets \[0, 3\] out of range for a model with 3 classes"):
        explainer.explain(model, images(2), [0, 3])


@pytest.mark.parametrize(
    ("cls", "params", "message"),
    [
        (CAM, {"classifier": ""}, "classifier must be a non-empty layer name or None, got ''"),
        (ScoreCAM, {"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
        (ScoreCAM, {"score": "prob"}, "score must be one of 'logit', 'probability', got 'prob'"),
        (ScoreCAM, {"subtract_baseline": 1}, "subtract_baseline must be True or False, got 1"),
        (ScoreCAM, {"baseline": float("inf")}, "baseline must be a finite number, got inf"),
        (GradCAMPlusPlus, {"relu": "yes"}, "relu must be True or False, got 'yes'"),
        (RISE, {"masks": 0}, "masks must be a positive integer, got 0"),
        (RISE, {"cell_size": 2.5}, "cell_size must be a positive integer, got 2.5"),
        (RISE, {"probability": 0}, r"probability must be in \(0, 1\], got 0"),
        (RISE, {"probability": 1.5}, r"probability must be in \(0, 1\], got 1.5"),
        (RISE, {"seed": -1}, "seed must be an integer >= 0, got -1"),
        (RISE, {"perturbation": "noise"}, "perturbation must be one of 'baseline', 'blur', 'healthy', got 'noise'"),
        (RISE, {"centred": None}, "centred must be True or False, got None"),
        (HiPe, {"initial_grid": 1}, "initial_grid must be at least 2 cells per side, got 1"),
        (HiPe, {"min_window": 0}, "min_window must be a positive integer, got 0"),
        (HiPe, {"blur_sigma": -1.0}, "blur_sigma must be a positive number, got -1.0"),
        (HiPe, {"baseline": "0"}, "baseline must be a finite number, got '0'"),
        (Lime, {"samples": True}, "samples must be a positive integer, got True"),
        (Lime, {"kernel_width": 0}, "kernel_width must be a positive number, got 0"),
        (Lime, {"alpha": -1}, "alpha must be >= 0, got -1"),
        (Lime, {"compactness": float("nan")}, "compactness must be a finite number, got nan"),
        (KernelShap, {"n_segments": 0}, "n_segments must be a positive integer, got 0"),
        (KernelShap, {"smoothing": -0.5}, "smoothing must be >= 0, got -0.5"),
    ],
)
def test_bad_settings(cls: type[Explainer], params: dict[str, object], message: str) -> None:
    with pytest.raises(ExplainerError, match=message):
        cls(**params)  # type: ignore[call-arg]


def test_input_dependent_errors() -> None:
    model = MODELS["seq"]()
    with pytest.raises(ExplainerError, match=r"initial_grid \(8\) has cells below one pixel on the 4x4 image"):
        HiPe().explain(model, torch.zeros(1, 1, 4, 4), [0])
    with pytest.raises(ExplainerError, match=r"feature_mask must be \[H, W\] = \(64, 64\) or \[B, H, W\]"):
        Lime().explain(model, images(1), [0], feature_mask=torch.zeros(32, 32, dtype=torch.long))
    with pytest.raises(ExplainerError, match="feature_mask must be an integer torch.Tensor .* of dtype torch.float32"):
        KernelShap().explain(model, images(1), [0], feature_mask=torch.zeros(64, 64))


def test_superpixels_follow_the_image() -> None:
    """SLIC on grayscale: roughly n_segments compact regions, independent of the intensity scale."""
    x = images(2)
    lime = Lime(n_segments=30)
    segments = lime.segment(x)
    assert segments.shape == (2, SIZE, SIZE) and segments.dtype == torch.long
    assert 10 <= int(segments[0].max()) + 1 <= 60
    assert torch.equal(lime.segment(3 * x + 1), segments)  # min-max rescaled before SLIC


def test_registry() -> None:
    names = {"cam", "gradcam_pp", "scorecam", "guided_gradcam", "rise", "hipe", "lime", "kernel_shap"}
    assert names <= set(available_explainers())
    assert isinstance(get_explainer("hipe", min_window=8), HiPe)
    assert isinstance(get_explainer("kernel_shap", samples=10), KernelShap)
    with pytest.raises(ExplainerError, match=r"unknown setting\(s\) 'mask' for explainer 'rise'"):
        get_explainer("rise", mask=3)


# --- chunk size by device ---------------------------------------------------------------------------


class _DeviceOnly:
    """Stands for a runner: only its ``device`` string matters to the chunk size."""

    def __init__(self, device: str) -> None:
        self.device = device


@pytest.mark.parametrize("method", ["occlusion", "rise", "hipe", "scorecam", "lime", "kernel_shap"])
def test_chunk_size_defaults_by_device(method: str) -> None:
    """Unset, a forward-only method passes 64 inputs at a time on a CPU and 256 on a GPU."""
    explainer = get_explainer(method)
    assert explainer.chunk_size is None
    cpu_module = nn.Linear(2, 2)
    assert chunk_size_for(explainer.chunk_size, cpu_module) == CHUNK_SIZE_CPU == 64
    for device in ("cuda:0", "CUDAExecutionProvider"):
        assert chunk_size_for(explainer.chunk_size, _DeviceOnly(device)) == CHUNK_SIZE_GPU == 256
    assert chunk_size_for(explainer.chunk_size, _DeviceOnly("CPUExecutionProvider")) == 64
    assert chunk_size_for(get_explainer(method, chunk_size=7).chunk_size, _DeviceOnly("cuda:0")) == 7
