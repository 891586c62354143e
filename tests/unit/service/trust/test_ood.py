"""service.trust.ood: Mahalanobis distance on pooled features (Lee et al. 2018): the fit against the
formulas written out, the .npz round trip, the feature hook on the demo network, the detector's
checks, and the shipped statistics of both demo models on held-out phantoms."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.inference.backends import load_runner
from service.inference.card import ModelCard
from service.models import demo_card_path, shortcut_card_path
from service.models.demo.network import DemoNet
from service.trust.ood import (
    OodDetector,
    OodError,
    OodStatistics,
    feature_layer,
    fit_statistics,
    mahalanobis_distances,
    pooled_features,
    threshold_from_held_out,
)


def _gaussian_classes(rng: np.random.Generator, per_class: int = 400, dim: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Two classes with different means and one correlated covariance."""
    mixing = rng.normal(size=(dim, dim))
    means = np.stack([np.zeros(dim), np.full(dim, 4.0)])
    labels = np.repeat([0, 1], per_class)
    features = means[labels] + rng.normal(size=(2 * per_class, dim)) @ mixing
    return features, labels


def test_fit_matches_the_formulas_written_out() -> None:
    rng = np.random.default_rng(0)
    features, labels = _gaussian_classes(rng)
    held_out, _ = _gaussian_classes(rng, per_class=100)
    stats = fit_statistics(features, labels, held_out, layer="head", shrinkage=0.1, percentile=95.0, margin=1.2)
    means = np.stack([features[labels == c].mean(axis=0) for c in (0, 1)])
    np.testing.assert_allclose(stats.means, means)
    centred = features - means[labels]
    shared = centred.T @ centred / len(features)
    shrunk = 0.9 * shared + 0.1 * np.trace(shared) / 5 * np.eye(5)
    np.testing.assert_allclose(stats.precision, np.linalg.inv(shrunk), rtol=1e-9)
    x = held_out[7]
    expected = min(np.sqrt((x - m) @ np.linalg.inv(shrunk) @ (x - m)) for m in means)
    assert stats.distances(held_out[7:8])[0] == pytest.approx(expected)
    assert stats.distances(means)[0] == pytest.approx(0.0, abs=1e-9), "a class mean is at distance 0"
    held_distances = stats.distances(held_out)
    assert stats.threshold == pytest.approx(1.2 * np.percentile(held_distances, 95.0))
    assert (stats.fitted_images, stats.held_out_images, stats.shrinkage) == (800, 200, 0.1)


def test_far_points_are_flagged_near_points_are_not() -> None:
    rng = np.random.default_rng(1)
    features, labels = _gaussian_classes(rng)
    held_out, _ = _gaussian_classes(rng, per_class=200)
    stats = fit_statistics(features, labels, held_out, layer="head")
    fresh, _ = _gaussian_classes(rng, per_class=200)
    scores = stats.scores(fresh)
    assert sum(s.out_of_distribution for s in scores) / len(scores) <= 0.02
    far = stats.scores(np.full((3, 5), 40.0))
    assert all(s.out_of_distribution and s.distance > s.threshold for s in far)
    assert stats.scores(np.full((1, 5), 40.0), threshold=1e6)[0].out_of_distribution is False


def test_shrinkage_makes_a_singular_covariance_invertible() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(10, 20))  # fewer images than features: the sample covariance is singular
    stats = fit_statistics(features, np.zeros(10, dtype=int), rng.normal(size=(5, 20)), layer="head", shrinkage=0.01)
    assert np.all(np.isfinite(stats.precision))
    with pytest.raises(OodError, match=r"singular \(condition number .*\); raise the shrinkage \(0.0\)"):
        fit_statistics(features, np.zeros(10, dtype=int), features, layer="head", shrinkage=0.0)


def test_threshold_from_held_out() -> None:
    distances = np.arange(1.0, 101.0)
    assert threshold_from_held_out(distances, 99.0, 1.5) == pytest.approx(1.5 * np.percentile(distances, 99.0))
    with pytest.raises(OodError, match="margin must be >= 1, got 0.5"):
        threshold_from_held_out(distances, 99.0, 0.5)
    with pytest.raises(OodError, match="percentile must be in"):
        threshold_from_held_out(distances, 0.0)
    with pytest.raises(OodError, match="non-empty 1-D"):
        threshold_from_held_out(np.array([]))


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.ones((4, 3)), np.zeros(3), r"labels must be one per feature row \(4\), got shape \(3,\)"),
        (np.ones((4,)), np.zeros(4), r"features must be a non-empty \[N, D\] array, got shape \(4,\)"),
        (np.full((4, 3), np.nan), np.zeros(4), "12 non-finite"),
    ],
)
def test_bad_fit_inputs_are_named(features: np.ndarray, labels: np.ndarray, message: str) -> None:
    with pytest.raises(OodError, match=message):
        fit_statistics(features, labels, np.ones((2, 3)), layer="head")


def test_distances_refuse_features_of_another_length() -> None:
    with pytest.raises(OodError, match="features have 4 columns, the OOD statistics 3"):
        mahalanobis_distances(np.ones((2, 4)), np.zeros((1, 3)), np.eye(3))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    features, labels = _gaussian_classes(rng)
    stats = fit_statistics(features, labels, features[:50], layer="classifier")
    path = stats.save(tmp_path / "ood.npz")
    loaded = OodStatistics.load(path)
    np.testing.assert_array_equal(loaded.means, stats.means)
    np.testing.assert_array_equal(loaded.precision, stats.precision)
    assert (loaded.layer, loaded.threshold, loaded.margin) == ("classifier", stats.threshold, stats.margin)
    with np.load(path, allow_pickle=False) as data:  # plain arrays, nothing pickled
        assert set(data.files) >= {"means", "precision", "threshold", "layer", "format_version"}
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not an npz")
    with pytest.raises(OodError, match=r"broken\.npz: not readable as OOD statistics"):
        OodStatistics.load(broken)


def test_statistics_check_their_shapes() -> None:
    with pytest.raises(OodError, match=r"precision must be \[3, 3\] for 3 features, got \(2, 2\)"):
        OodStatistics("head", np.zeros((2, 3)), np.eye(2), 1.0, 0.01, 10, 5, 99.0, 1.5)
    with pytest.raises(OodError, match="threshold must be a positive distance, got 0.0"):
        OodStatistics("head", np.zeros((2, 3)), np.eye(3), 0.0, 0.01, 10, 5, 99.0, 1.5)


# --- features of a real network -----------------------------------------------------------------


def _demo_net() -> DemoNet:
    torch.manual_seed(0)
    return DemoNet().eval()


def test_the_default_feature_layer_is_the_last_linear() -> None:
    net = _demo_net()
    name, module = feature_layer(net)
    assert name == "classifier" and module is net.classifier
    assert feature_layer(net, "features.block4")[0] == "features.block4"
    with pytest.raises(OodError, match="unknown OOD feature layer 'head'.*'classifier'"):
        feature_layer(net, "head")
    with pytest.raises(OodError, match="no nn.Linear"):
        feature_layer(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_torchscript_modules_are_refused_with_the_reason() -> None:
    scripted = torch.jit.script(_demo_net())
    with pytest.raises(OodError, match="TorchScript modules do not take.*'torch' weights"):
        feature_layer(scripted)


def test_pooled_features_are_the_input_of_the_head_and_leave_the_model_as_found() -> None:
    net = _demo_net().train()
    batch = torch.randn(5, 1, 224, 224)
    features = pooled_features(net, batch)
    net.eval()
    with torch.no_grad():
        expected = torch.flatten(net.pool(net.features(batch)), 1).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    assert features.shape == (5, 64) and features.dtype == np.float64
    net.train()
    pooled_features(net, batch.numpy())
    assert net.training and net.features.block1[1].training, "modes are restored"
    assert not net.classifier._forward_pre_hooks, "the hook is removed"


def test_pooled_features_ignore_other_threads_passes() -> None:
    net = _demo_net()
    started, release = threading.Event(), threading.Event()
    seen: list[torch.Tensor] = []

    def other_thread() -> None:
        started.wait()
        with torch.no_grad():
            seen.append(net(torch.randn(3, 1, 224, 224)))  # would add a 3-row record if the hook caught it
        release.set()

    original = net.features.forward

    def slow_features(x: torch.Tensor) -> torch.Tensor:
        if threading.current_thread() is threading.main_thread():
            started.set()
            release.wait(timeout=10)
        return original(x)

    net.features.forward = slow_features  # type: ignore[method-assign]
    worker = threading.Thread(target=other_thread)
    worker.start()
    features = pooled_features(net, torch.randn(2, 1, 224, 224))
    worker.join()
    assert seen and features.shape == (2, 64)


def test_a_layer_that_runs_twice_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.head(x.flatten(1)[:, :4]))

    with pytest.raises(OodError, match="ran 2 times in one forward pass"):
        pooled_features(Twice(), torch.randn(1, 1, 2, 2))


def test_detector_checks_layer_and_dimension() -> None:
    net = _demo_net()
    rng = np.random.default_rng(4)
    stats = fit_statistics(rng.normal(size=(100, 64)), np.zeros(100, dtype=int), rng.normal(size=(20, 64)), layer="x")
    with pytest.raises(
        OodError, match="fitted on the input of layer 'x', but the card's feature layer is 'classifier'"
    ):
        OodDetector.for_module(stats, net, None)
    small = fit_statistics(
        rng.normal(size=(100, 8)), np.zeros(100, dtype=int), rng.normal(size=(20, 8)), layer="classifier"
    )
    detector = OodDetector.for_module(small, net, None, threshold=3.0)
    assert detector.threshold == 3.0
    with pytest.raises(OodError, match="gives 64 features, the OOD statistics hold 8"):
        detector.check_dimension(net, np.zeros((1, 1, 224, 224), dtype=np.float32))


# --- the shipped statistics ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("card_path", "token_class"), [(demo_card_path, None), (shortcut_card_path, "nodule")])
def test_shipped_statistics_pass_few_held_out_phantoms(card_path, token_class: str | None) -> None:
    """Phantoms of the test seed, which neither the fit nor the threshold saw, drawn like the training
    images (the cheating model's with its token on the nodules): at most 2 % above the threshold."""
    from service.tools.calibrate import _phantom_inputs
    from tests.helpers import HELD_OUT_SEED

    card = ModelCard.load(card_path())
    module = load_runner(card, "torch", device="cpu").torch_module
    stats = OodStatistics.load(card.auxiliary_path("ood_statistics"))
    detector = OodDetector.for_module(stats, module, card.trust.ood.layer)
    inputs = np.stack(list(_phantom_inputs(card, 90, HELD_OUT_SEED, token_class)))
    scores = detector.score(module, card.input.normalise(inputs))
    flagged = sum(s.out_of_distribution for s in scores)
    assert flagged / len(scores) <= 0.02, f"{flagged} of {len(scores)} held-out phantoms flagged"
    assert np.median([s.distance for s in scores]) < 0.6 * detector.threshold


# --- the goals, through the node's pipeline -------------------------------------------------------

#: Non-chest radiographs and CT / MR slices of pydicom and pydicom-data, forced through the chest models.
NOT_CHEST = (
    "RG3_UNCR.dcm",  # CR of an extremity
    "CT_small.dcm",
    "MR_small.dcm",
    "693_UNCR.dcm",  # CT
    "MR2_UNCR.dcm",
    "MR2_UNCI.dcm",
    "MR2_J2KR.dcm",
    "MR2_J2KI.dcm",
)


@pytest.fixture(scope="module", params=[demo_card_path, shortcut_card_path], ids=["demo", "shortcut"])
def forced_pipeline(request: pytest.FixtureRequest):
    from service.inference.deployed import DeployedModel
    from service.node.pipeline import ExplainPipeline

    model = DeployedModel.from_card_path(request.param())
    yield ExplainPipeline(model, ["gradcam"], outputs=(), enforce_applies_to=False)
    model.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", NOT_CHEST)
def test_non_chest_images_forced_through_the_chest_model_are_flagged(forced_pipeline, name: str) -> None:
    import pydicom

    from tests.helpers import data_file

    result = forced_pipeline.process(pydicom.dcmread(data_file(name)))
    assert result.ood and all(signal.out_of_distribution for signal in result.ood)
    assert min(signal.distance for signal in result.ood) > 2 * result.ood[0].threshold, [
        round(s.distance, 1) for s in result.ood
    ]


@pytest.mark.slow
def test_a_real_chest_radiograph_is_unlike_the_phantoms_the_model_saw(forced_pipeline) -> None:
    """RG1 (a real chest CR, 1955 x 1841) is flagged by both demo models, rightly: they were fitted
    on phantoms only, and their features place a real radiograph far from every phantom class
    (distance about 28 for the honest model, 48 for the cheating one, thresholds 11.5 and 10.4).
    Flagging it does not say the image is not a chest; it says these models' answers on it rest on
    nothing they were shown (the honest model answers "nodule", p = 0.51)."""
    import pydicom

    from tests.helpers import data_file

    result = forced_pipeline.process(pydicom.dcmread(data_file("RG1_UNCR.dcm")))
    (signal,) = result.ood
    assert signal.out_of_distribution and signal.distance > 2 * signal.threshold
