"""Cascading randomisation and the random-logit check against Quantus (MPRT, RandomLogit), the layer
order from the module tree, the model left as found, and the literature's verdicts on the demo model."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np
import pytest
import torch
from scipy.ndimage import sobel
from skimage.metrics import structural_similarity
from torch import nn

from service.explain import get_explainer
from service.models.demo.network import DemoNet
from service.trust import TrustMetricError
from service.trust.randomisation import (
    cascading_randomisation,
    random_logit,
    randomisation_order,
    randomised_models,
    ssim_baseline,
)
from tests.unit.service.trust.conftest import DemoCase, blob_images, small_net

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:quantus")


# --- the test's own similarity, handed to Quantus ----------------------------------------------------


def min_max_absolute(a: np.ndarray, **_: object) -> np.ndarray:
    """Quantus ``normalise_func``: each sample's |map| scaled to [0, 1] (Quantus' default divides the whole
    batch by one maximum)."""
    flat = np.abs(a).reshape(len(a), -1)
    low, span = flat.min(axis=1, keepdims=True), np.ptp(flat, axis=1, keepdims=True)
    return ((flat - low) / np.where(span > 0, span, 1.0)).reshape(a.shape)


def ssim_2d(side: int) -> Callable[..., np.ndarray]:
    """Quantus ``similarity_func``: SSIM on the square 2-D maps that MPRT hands over flattened."""

    def similarity(a: np.ndarray, b: np.ndarray, batched: bool = True, **_: object) -> np.ndarray:
        pairs = zip(a.reshape(-1, side, side), b.reshape(-1, side, side))
        return np.array([structural_similarity(x, y, data_range=1.0) for x, y in pairs])

    return similarity


def quantus_explain_func(explainer: object) -> Callable[..., np.ndarray]:
    def explain(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: object) -> np.ndarray:
        return explainer.explain(model, torch.as_tensor(inputs), [int(t) for t in targets]).numpy()  # type: ignore[attr-defined]

    return explain


def quantus_mprt(
    quantus: ModuleType, model: nn.Module, explainer: object, x: torch.Tensor, targets: Sequence[int], seed: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Quantus' MPRT (top-down, cascading) with 2-D SSIM on min-max-normalised |maps|, and with its own Spearman.

    Quantus' own ``ssim`` cannot stand in: MPRT hands it the maps flattened to 1-D (a 1-D SSIM over
    raster order), after dividing the whole batch by one maximum, and it returns a list, on which
    MPRT 0.6.0 calls ``.tolist()`` (AttributeError). Its Spearman needs none of that (ranks only).
    """
    common = dict(model=model, x_batch=x.numpy(), y_batch=np.array(targets), a_batch=None, device="cpu")
    explain = quantus_explain_func(explainer)
    ssim_metric = quantus.MPRT(
        similarity_func=ssim_2d(x.shape[-1]), normalise_func=min_max_absolute, seed=seed, disable_warnings=True
    )
    spearman_metric = quantus.MPRT(
        similarity_func=quantus.similarity_func.correlation_spearman, seed=seed, disable_warnings=True
    )
    return (
        ssim_metric(**common, explain_func=explain, batch_size=len(x)),
        spearman_metric(**common, explain_func=explain, batch_size=len(x)),
    )


def at_unit_ends(scores: dict[str, list[float]], units: Sequence[str]) -> np.ndarray:
    """Quantus' scores ``[S, B]`` after the last leaf of each unit (Quantus randomises one leaf per step)."""
    names = [name for name in scores if name != "original"]
    ends = [[n for n in names if n == unit or n.startswith(unit + ".")][-1] for unit in units]
    return np.array([scores[name] for name in ends])


# --- layer order and the randomised copies -------------------------------------------------------------


def test_demo_network_is_randomised_head_first_then_block4_down_to_the_stem() -> None:
    assert randomisation_order(DemoNet()) == [
        "classifier",
        "features.block4",
        "features.block3",
        "features.block2",
        "features.block1",
        "features.stem",
    ]


def test_order_takes_blocks_whole_and_looks_into_containers_of_blocks() -> None:
    assert randomisation_order(small_net()) == ["classifier", "features.block2", "features.block1", "features.stem"]
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    assert randomisation_order(plain) == ["4", "2", "0"]
    with pytest.raises(TrustMetricError, match="ReLU has no parametrised layers"):
        randomisation_order(nn.ReLU())


def test_randomised_copies_are_cumulative_seeded_and_leave_the_model_as_found() -> None:
    model = small_net()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    units = randomisation_order(model)
    copies = []
    for step, (name, randomised) in enumerate(randomised_models(model, seed=3)):
        assert name == units[step]
        state = randomised.state_dict()
        for key, value in trained.items():
            changed = not torch.equal(state[key], value)
            in_random_unit = any(key.startswith(unit + ".") for unit in units[: step + 1])
            if key.endswith(("weight", "running_mean")):  # BatchNorm's reset sets weight 1, running mean 0
                assert changed == in_random_unit, (step, key)
        copies.append({k: v.clone() for k, v in state.items()})
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), f"{key} of the model itself changed"
    assert torch.equal(torch.get_rng_state(), rng_state), "the global random state must be restored"
    again = [{k: v.clone() for k, v in m.state_dict().items()} for _, m in randomised_models(model, seed=3)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(copies, again) for k in a)
    other = dict(randomised_models(model, ["classifier"], seed=4))["classifier"]
    assert not torch.equal(other.classifier.weight, copies[0]["classifier.weight"])


def test_mprt_similarities_per_step_equal_quantus(quantus: ModuleType) -> None:
    model, x = small_net(), blob_images(count=6)
    targets = [0, 1, 2, 0, 1, 2]
    explainer = get_explainer("saliency")
    ours = cascading_randomisation(model, explainer, x, targets, seed=5)
    ssim_scores, spearman_scores = quantus_mprt(quantus, model, explainer, x, targets, seed=5)
    units = [step.layer for step in ours.steps]
    assert units == randomisation_order(model)
    assert len(ssim_scores) - 1 > len(units), "Quantus steps leaf by leaf, finer than our units"
    reference_ssim, reference_spearman = at_unit_ends(ssim_scores, units), at_unit_ends(spearman_scores, units)
    np.testing.assert_allclose([step.ssim for step in ours.steps], reference_ssim, rtol=0, atol=1e-6)  # float32 maps
    # Quantus divides float32 maps by their maximum first, which can merge nearly equal values into ties.
    np.testing.assert_allclose([step.spearman for step in ours.steps], reference_spearman, rtol=0, atol=1e-4)
    assert reference_ssim.mean(axis=1).min() < 0.9, "randomisation must change the maps for the test to mean something"


def test_a_map_that_ignores_the_model_fails() -> None:
    """Adebayo's point: an edge detector is not explained away by randomising the model."""

    class Edges:
        def explain(self, model: nn.Module, batch: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
            image = batch[:, 0].numpy()
            return torch.from_numpy(np.hypot(sobel(image, axis=1), sobel(image, axis=2)))

    result = cascading_randomisation(small_net(), Edges(), blob_images(count=6), [0] * 6)
    np.testing.assert_allclose(result.mean_ssim, 1.0)
    assert result.baseline_ssim < 1.0 and not result.passes


def test_ssim_baseline_is_the_mean_over_random_pairs_of_different_images() -> None:
    maps = np.random.default_rng(0).normal(size=(5, 24, 24)).cumsum(axis=2)
    normalised = [(m - m.min()) / np.ptp(m) for m in np.abs(maps)]
    every_pair = {
        (i, j): structural_similarity(normalised[i], normalised[j], data_range=1.0)
        for i, j in itertools.combinations(range(5), 2)
    }
    assert ssim_baseline(maps) == pytest.approx(np.mean(list(every_pair.values())), abs=1e-12)  # 10 pairs < 50
    three = ssim_baseline(maps, pairs=3, seed=1)
    sums = {sum(c) / 3 for c in itertools.combinations(every_pair.values(), 3)}
    assert min(abs(three - s) for s in sums) < 1e-12
    assert ssim_baseline(maps, pairs=3, seed=1) == three


def test_random_logit_equals_quantus_on_a_two_class_model(quantus: ModuleType) -> None:
    model, x = small_net(classes=2), blob_images(count=4)
    targets = [0, 1, 1, 0]
    explainer = get_explainer("saliency")
    ours = random_logit(model, explainer, x, targets, seed=0)
    np.testing.assert_array_equal(ours.other_targets, [1, 0, 0, 1])  # the only other class
    metric = quantus.RandomLogit(
        num_classes=2, similarity_func=ssim_2d(x.shape[-1]), normalise_func=min_max_absolute, disable_warnings=True
    )
    reference = metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=np.array(targets),
        a_batch=None,
        explain_func=quantus_explain_func(explainer),
        device="cpu",
    )
    np.testing.assert_allclose(ours.ssim, reference, rtol=0, atol=1e-6)  # Quantus normalises in float32


def test_random_logit_draws_other_classes_from_the_seed() -> None:
    model, x = small_net(), blob_images(count=8)
    targets = [0, 1, 2, 0, 1, 2, 0, 1]
    explainer = get_explainer("saliency")
    first = random_logit(model, explainer, x, targets, seed=2)
    assert (first.other_targets != np.array(targets)).all()
    assert len(set(zip(targets, first.other_targets.tolist()))) > 3, "both other classes must be drawn"
    np.testing.assert_array_equal(random_logit(model, explainer, x, targets, seed=2).other_targets, first.other_targets)
    assert ((first.ssim > -1) & (first.ssim < 1)).all()


def test_randomisation_errors_name_what_was_found() -> None:
    model, x = small_net(), blob_images(count=2)
    explainer = get_explainer("saliency")
    with pytest.raises(TrustMetricError, match=r"layers \['features.block9'\] are not modules of SmallNet"):
        next(randomised_models(model, ["features.block9"]))
    with pytest.raises(TrustMetricError, match="randomisation needs a torch.nn.Module, got str"):
        next(randomised_models("model"))  # type: ignore[arg-type]
    with pytest.raises(TrustMetricError, match=r"verdict_after must be a step in 1..4, got 5"):
        cascading_randomisation(model, explainer, x, [0, 1], verdict_after=5)
    with pytest.raises(TrustMetricError, match="maps of at least 2 images, got 1"):
        ssim_baseline(np.ones((1, 8, 8)))
    with pytest.raises(TrustMetricError, match=r"targets \[0, 3\] out of range for 3 classes"):
        random_logit(model, explainer, x, [0, 3])


# --- the demo model: the literature's verdicts, ours and Quantus' --------------------------------------

#: (registry name, settings, passes): Adebayo et al. 2018 and Arun et al. 2021 on the demo model.
DEMO_METHODS = [
    ("guided_backprop", {}, False),
    ("gradcam", {"target_layer": "features.block4"}, True),
    ("saliency", {}, True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "settings", "passes"), DEMO_METHODS, ids=[m[0] for m in DEMO_METHODS])
def test_demo_model_verdicts_match_the_literature_and_quantus(
    quantus: ModuleType, demo_case: DemoCase, method: str, settings: dict[str, object], passes: bool
) -> None:
    explainer = get_explainer(method, **settings)
    x, targets = demo_case.batch, demo_case.targets
    ours = cascading_randomisation(demo_case.module, explainer, x, targets, seed=0)
    assert [step.layer for step in ours.steps][:2] == ["classifier", "features.block4"]
    print(
        f"{method}: SSIM after head {ours.mean_ssim[0]:.3f}, after block4 {ours.mean_ssim[1]:.3f}, "
        f"baseline {ours.baseline_ssim:.3f}: {'passes' if ours.passes else 'FAILS'}"
    )
    assert ours.passes == passes

    ssim_scores, _ = quantus_mprt(quantus, demo_case.module, explainer, x, targets, seed=0)
    reference = at_unit_ends(ssim_scores, [step.layer for step in ours.steps])
    np.testing.assert_allclose([step.ssim for step in ours.steps], reference, rtol=0, atol=1e-6)
    trained = min_max_absolute(explainer.explain(demo_case.module, x, targets).numpy())
    every_pair = [
        structural_similarity(trained[i], trained[j], data_range=1.0)
        for i, j in itertools.combinations(range(len(x)), 2)
    ]
    quantus_passes = reference[1].mean() <= np.mean(every_pair)
    print(f"  Quantus MPRT: {reference[1].mean():.3f} after block4, baseline (all pairs) {np.mean(every_pair):.3f}")
    assert quantus_passes == ours.passes
