"""Meaningful perturbation and extremal perturbation (service.explain.methods.optimisation).

Properties that do not depend on our own earlier output: on hand-built models whose evidence is
known, the masks find it (and ignore a look-alike the model does not count); deleting the most
salient pixels hurts the score more than deleting random ones; keeping the extremal region keeps
more score than random regions of the same size; the extremal area matches the request. Then the
explainer contract: batch = single runs, determinism, model left as found, in-place ReLU, no
torch module (ONNX) refused, every setting validated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.explain.base import Explainer, ExplainerError
from service.explain.methods.optimisation import ExtremalPerturbation, MeaningfulPerturbation
from service.explain.methods.perturbation import gaussian_blur
from tests.unit.service.explain.explainer_checks import left_as_found

# --- models with known evidence -------------------------------------------------------------------

#: RegionNet images: 48 x 48, one channel.
REGION_SIZE = 48
#: Where RegionNet looks, and the bright square it finds there.
REGION = (slice(6, 26), slice(24, 44))
SQUARE = (slice(12, 20), slice(30, 38))
#: An identical bright square outside the region: the model ignores it.
DISTRACTOR = (slice(30, 38), slice(6, 14))

#: BlobNet images: 32 x 32, three colour channels, a class per colour.
BLOB_SIZE = 32
BLOB_RADIUS2 = 12  # squared radius in pixels: about 37 pixels per blob
BLUR = 3.0  # blur sigma (pixels) of the perturbation in the BlobNet tests


class RegionNet(nn.Module):
    """Class 0's logit is ``gain`` times the mean, over ``REGION``, of ``ReLU(5x5 mean - 0.5)``:
    only bright structure inside the region counts. Class 1's logit is the constant ``other``."""

    def __init__(self, gain: float = 100.0, other: float = 2.0) -> None:
        super().__init__()
        self.detector = nn.Conv2d(1, 1, 5, padding=2)
        with torch.no_grad():
            self.detector.weight.fill_(1 / 25)
            self.detector.bias.fill_(-0.5)
        region = torch.zeros(1, 1, REGION_SIZE, REGION_SIZE)
        region[(0, 0, *REGION)] = 1
        self.register_buffer("region", region)
        self.gain, self.other = gain, other

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = (F.relu(self.detector(x)) * self.region).sum(dim=(1, 2, 3)) / self.region.sum()
        return torch.stack([self.gain * evidence, torch.full_like(evidence, self.other)], dim=1)


def region_image() -> torch.Tensor:
    """Faint noise, the bright square inside the region and its twin outside, ``[1, 1, 48, 48]``."""
    generator = torch.Generator().manual_seed(3)
    x = 0.1 * torch.rand(1, 1, REGION_SIZE, REGION_SIZE, generator=generator)
    x[(0, 0, *SQUARE)] = 1
    x[(0, 0, *DISTRACTOR)] = 1
    return x


def region_mask(where: tuple[slice, slice]) -> torch.Tensor:
    mask = torch.zeros(REGION_SIZE, REGION_SIZE, dtype=torch.bool)
    mask[where] = True
    return mask


class BlobNet(nn.Module):
    """A GAP classifier built by hand: class ``k`` counts bright blobs in colour channel ``k``.

    5x5 colour-contrast detectors (plus three weak random feature maps), batch norm with
    non-trivial statistics, ReLU, a 1x1 mixing convolution, ReLU, global average pooling and a
    contrastive linear head (each class minus the mean of all).
    """

    def __init__(self, inplace: bool = True, gain: float = 40.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5, padding=2),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(6, 3, 1),
            nn.ReLU(inplace=inplace),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
        conv, norm, mix, linear = self.features[0], self.features[1], self.features[3], self.head[2]
        with torch.no_grad():
            conv.weight.copy_(0.02 * torch.randn(6, 3, 5, 5, generator=generator))
            for k in range(3):
                conv.weight[k] -= 0.5 / 25
                conv.weight[k, k] += 1.5 / 25
            conv.bias.copy_(torch.tensor([-0.4] * 3 + [0.0] * 3))
            norm.running_mean.copy_(0.05 * torch.randn(6, generator=generator))
            norm.running_var.copy_(1 + 0.2 * torch.rand(6, generator=generator))
            norm.weight.copy_(1 + 0.1 * torch.randn(6, generator=generator))
            norm.bias.copy_(0.02 * torch.randn(6, generator=generator))
            mix.weight.copy_(0.05 * torch.randn(3, 6, 1, 1, generator=generator))
            mix.weight[:, :3, 0, 0] += torch.eye(3)
            mix.bias.zero_()
            linear.weight.copy_(gain * (torch.eye(3) - 1 / 3) * BLOB_SIZE**2 / 60)
            linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


#: (row, col) of the target blob and of the distractor blob (the next colour) in each image.
BLOB_CENTRES = [((9, 10), (22, 23)), ((23, 8), (8, 22)), ((16, 24), (20, 7)), ((7, 17), (24, 15))]


def blob_images(n: int = 3) -> tuple[torch.Tensor, list[int]]:
    """``n`` images ``[n, 3, 32, 32]``: noise, a blob of the target colour ``i % 3`` and a blob of
    the next colour elsewhere; and the targets."""
    generator = torch.Generator().manual_seed(1)
    x = 0.1 * torch.randn(n, 3, BLOB_SIZE, BLOB_SIZE, generator=generator)
    rows, cols = torch.meshgrid(torch.arange(BLOB_SIZE), torch.arange(BLOB_SIZE), indexing="ij")
    for i in range(n):
        for colour, (row, col) in zip((i % 3, (i + 1) % 3), BLOB_CENTRES[i]):
            x[i, colour] += (((rows - row) ** 2 + (cols - col) ** 2) <= BLOB_RADIUS2).float()
    return x, [i % 3 for i in range(n)]


# --- explainers at test sizes -----------------------------------------------------------------------


def meaningful(**settings: object) -> MeaningfulPerturbation:
    """Fong & Vedaldi scaled to 32-48 px images: an 8 x 8 mask, small blur and jitter."""
    defaults: dict[str, object] = {"iterations": 80, "mask_size": 8, "blur_sigma": BLUR, "jitter": 1}
    return MeaningfulPerturbation(**{**defaults, **settings})


def extremal(**settings: object) -> ExtremalPerturbation:
    """Extremal perturbation scaled to 32-48 px images; the regulariser grows x16 over the run."""
    defaults: dict[str, object] = {
        "iterations": 100,
        "mask_size": 8,
        "sigma": 1.5,
        "blur_sigma": BLUR,
        "jitter": 1,
        "regulariser_growth": 16 ** (1 / 100),
    }
    return ExtremalPerturbation(**{**defaults, **settings})


FACTORIES: dict[str, Callable[..., Explainer]] = {"meaningful": meaningful, "extremal": extremal}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the small models gain nothing from more, and on a shared machine
    spinning worker threads make the run time erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def target_scores(model: nn.Module, x: torch.Tensor, target: int, probability: bool) -> torch.Tensor:
    with torch.no_grad():
        logits = model.eval()(x)
    return (torch.softmax(logits, dim=1) if probability else logits)[:, target]


def top_pixels(saliency: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean ``[H, W]``: the ``count`` highest pixels of ``saliency``."""
    chosen = torch.zeros(saliency.numel(), dtype=torch.bool)
    chosen[saliency.flatten().topk(count).indices] = True
    return chosen.view(saliency.shape)


def random_regions(count: int, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, H, W]`` boolean: blob-like random regions of exactly ``pixels`` pixels each (the
    top pixels of bilinearly upsampled 4 x 4 noise)."""
    noise = F.interpolate(torch.rand(count, 1, 4, 4, generator=generator), size=(BLOB_SIZE, BLOB_SIZE), mode="bilinear")
    return torch.stack([top_pixels(field[0], pixels) for field in noise])


# --- localisation on a model whose evidence is known --------------------------------------------------


LOCALISATION = {
    "meaningful": (lambda: meaningful(mask_size=12, blur_sigma=4), RegionNet()),
    # probability 1 - 2e-7: its gradient vanishes, the logit's does not
    "meaningful-logit-confident": (
        lambda: meaningful(mask_size=12, blur_sigma=4, score="logit"),
        RegionNet(gain=400, other=0),
    ),
    "extremal": (lambda: extremal(areas=(0.05,), mask_size=12, blur_sigma=4), RegionNet()),
    "extremal-confident": (lambda: extremal(areas=(0.05,), mask_size=12, blur_sigma=4), RegionNet(gain=400, other=0)),
}


@pytest.mark.parametrize("case", LOCALISATION)
def test_finds_the_square_the_model_counts_and_ignores_its_twin(case: str) -> None:
    factory, model = LOCALISATION[case]
    saliency = factory().explain(model, region_image(), [0])[0]
    region, distractor = region_mask(REGION), region_mask(DISTRACTOR)
    top = top_pixels(saliency, 64)  # as many pixels as the square
    assert region[top].float().mean() >= 0.9, "the most salient pixels lie outside the region the model reads"
    assert region.flatten()[saliency.flatten().argmax()]
    assert saliency[distractor].mean() < 0.05, "the twin square the model ignores came out salient"
    assert saliency[region_mask(SQUARE)].mean() > 0.5


# --- faithfulness ---------------------------------------------------------------------------------------


def test_meaningful_deleting_the_top_pixels_hurts_more_than_random_pixels() -> None:
    model, (x, targets) = BlobNet(), blob_images(4)
    saliency = meaningful().explain(model, x, targets)
    blurred = gaussian_blur(x, BLUR)
    count = BLOB_SIZE**2 // 10
    generator = torch.Generator().manual_seed(5)
    for i, target in enumerate(targets):
        clean = target_scores(model, x[i : i + 1], target, probability=True)
        deleted = top_pixels(saliency[i], count)
        top_score = target_scores(model, torch.where(deleted, blurred[i], x[i])[None], target, probability=True)
        random = torch.zeros(20, BLOB_SIZE * BLOB_SIZE, dtype=torch.bool)
        for row in random:
            row[torch.randperm(BLOB_SIZE * BLOB_SIZE, generator=generator)[:count]] = True
        random = random.view(20, 1, BLOB_SIZE, BLOB_SIZE)
        random_scores = target_scores(model, torch.where(random, blurred[i], x[i]), target, probability=True)
        assert top_score < clean / 2, (
            f"image {i}: deleting the top 10% left {top_score.item():.3f} of {clean.item():.3f}"
        )
        assert top_score < random_scores.min(), f"image {i}: a random 10% deletion hurt more than the top 10%"


def test_extremal_region_keeps_more_score_than_random_regions_of_the_same_size() -> None:
    model, (x, targets) = BlobNet(), blob_images(4)
    area = 0.1
    masks = extremal(areas=(area,)).masks(model, x, targets)[:, 0]
    blurred = gaussian_blur(x, BLUR)
    pixels = round(area * BLOB_SIZE**2)
    generator = torch.Generator().manual_seed(7)
    for i, target in enumerate(targets):
        kept = top_pixels(masks[i], pixels)
        kept_score = target_scores(model, torch.where(kept, x[i], blurred[i])[None], target, probability=False)
        regions = random_regions(30, pixels, generator)[:, None]
        random_scores = target_scores(model, torch.where(regions, x[i], blurred[i]), target, probability=False)
        assert kept_score > random_scores.max(), (
            f"image {i}: kept region scores {kept_score.item():.2f}, a random region {random_scores.max().item():.2f}"
        )


def test_extremal_area_matches_the_request_and_the_map_is_the_mean_over_areas() -> None:
    model, (x, targets) = BlobNet(), blob_images(3)
    explainer = extremal(areas=(0.1, 0.3))
    masks = explainer.masks(model, x, targets)
    assert masks.shape == (3, 2, BLOB_SIZE, BLOB_SIZE)
    assert masks.min() >= 0 and masks.max() <= 1
    areas = masks.mean(dim=(2, 3))
    torch.testing.assert_close(areas, torch.tensor([[0.1, 0.3]]).expand(3, 2), rtol=0, atol=0.05)
    torch.testing.assert_close(explainer.explain(model, x, targets), masks.mean(dim=1))


# --- explainer contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", FACTORIES)
def test_batch_equals_single_runs(method: str) -> None:
    model, (x, targets) = BlobNet(), blob_images(3)
    explainer = FACTORIES[method](iterations=40, jitter=2)
    batch = explainer.explain(model, x, targets)
    assert batch.shape == (3, BLOB_SIZE, BLOB_SIZE) and batch.dtype == torch.float32
    assert (batch.amax(dim=(1, 2)) > 0.5).all(), "a blank map would make the comparison say nothing"
    single = torch.cat([explainer.explain(model, x[i : i + 1], [t]) for i, t in enumerate(targets)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", FACTORIES)
def test_deterministic_for_a_seed(method: str) -> None:
    model, (x, targets) = BlobNet(), blob_images(2)
    first = FACTORIES[method](iterations=30, jitter=2, seed=4).explain(model, x, targets)
    again = FACTORIES[method](iterations=30, jitter=2, seed=4).explain(model, x, targets)
    other = FACTORIES[method](iterations=30, jitter=2, seed=5).explain(model, x, targets)
    assert torch.equal(first, again)
    assert not torch.equal(first, other), "the seed drives the jitter, so another seed should change the map"


@pytest.mark.parametrize("method", FACTORIES)
def test_model_left_as_found(method: str) -> None:
    model, (x, targets) = BlobNet(), blob_images(2)
    with left_as_found(model, x, frozen=model.features[0].weight, eval_part=model.head):
        FACTORIES[method](iterations=5).explain(model, x, targets)


@pytest.mark.parametrize("method", FACTORIES)
def test_in_place_relu_gives_the_same_maps(method: str) -> None:
    (x, targets), explainer = blob_images(2), FACTORIES[method](iterations=20)
    in_place = explainer.explain(BlobNet(inplace=True), x, targets)
    torch.testing.assert_close(in_place, explainer.explain(BlobNet(inplace=False), x, targets))


@pytest.mark.parametrize("method", FACTORIES)
def test_runs_when_the_caller_is_in_inference_mode(method: str) -> None:
    model, (x, targets), explainer = BlobNet(), blob_images(1), FACTORIES[method](iterations=10)
    with torch.inference_mode():
        inside = explainer.explain(model, x, targets)
    torch.testing.assert_close(inside, explainer.explain(model, x, targets))


@pytest.mark.parametrize("method", FACTORIES)
def test_target_out_of_range_is_a_clear_error(method: str) -> None:
    x, _ = blob_images(1)
    with pytest.raises(ExplainerError, match=r"targets \[3\] out of range for a model with 3 classes"):
        FACTORIES[method](iterations=2).explain(BlobNet(), x, [3])


BAD_SETTINGS = [
    (cls, name, value)
    for cls in (MeaningfulPerturbation, ExtremalPerturbation)
    for name, value in [
        ("iterations", 0),
        ("iterations", 2.5),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("mask_size", -3),
        ("mask_size", True),
        ("perturbation", "noise"),
        ("blur_sigma", 0),
        ("baseline", float("inf")),
        ("score", "log_probability"),
        ("jitter", -1),
        ("seed", -2),
        ("seed", "7"),
    ]
] + [
    (MeaningfulPerturbation, "area_weight", -0.1),
    (MeaningfulPerturbation, "area_exponent", 0.5),
    (MeaningfulPerturbation, "tv_weight", -1),
    (MeaningfulPerturbation, "tv_beta", 0.9),
    (MeaningfulPerturbation, "tv_beta", "3"),
    (ExtremalPerturbation, "areas", 0.0),
    (ExtremalPerturbation, "areas", 1.0),
    (ExtremalPerturbation, "areas", ()),
    (ExtremalPerturbation, "areas", (0.1, 1.5)),
    (ExtremalPerturbation, "areas", "0.1"),
    (ExtremalPerturbation, "sigma", -1.0),
    (ExtremalPerturbation, "regulariser_weight", 0),
    (ExtremalPerturbation, "regulariser_growth", 0.99),
]


@pytest.mark.parametrize(("cls", "name", "value"), BAD_SETTINGS)
def test_bad_setting_is_refused_naming_the_value(cls: type[Explainer], name: str, value: object) -> None:
    with pytest.raises(ExplainerError) as error:
        cls(**{name: value})
    message = str(error.value)
    assert name in message
    assert repr(value) in message or (isinstance(value, tuple) and any(repr(v) in message for v in value)), message
