"""Real-time saliency: the shipped masker localises phantom nodules, its top region matters to the
demo model, the explainer contract holds (batch = singles, any runner, model untouched, clear
errors), a tiny training run writes a masker the explainer loads, and the masker comes from the
model card (auxiliary.saliency_masker) through the node's pipeline."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from dicom_io.pixels import PreparedFrame, prepare_frames
from service.cli.main import main as cli_main
from service.explain.base import ExplainerError
from service.explain.methods.realtime import RealtimeSaliency, load_masker
from service.explain.registry import get_explainer
from service.inference.backends import OnnxRunner
from service.inference.card import ModelCard, sha256_of
from service.inference.deployed import DeployedModel
from service.models import demo_card_path
from service.models.demo.network import DemoNet
from service.node.pipeline import ExplainPipeline, card_settings
from service.synthetic.phantoms import CLASSES
from service.tools.demo.train import INPUT_SPEC, normalise
from service.tools.demo.train_saliency import SaliencySettings, train_saliency_masker
from tests.helpers import held_out_nodules
from tests.unit.service.explain.explainer_checks import left_as_found

#: Neither the demo model (seeds 7, 1007) nor the masker (11, 1011) saw these phantoms.
NODULES = 30
NODULE = CLASSES.index("nodule")
#: Share of the pixels removed in the deletion test.
DELETED = 0.02


@dataclass(frozen=True)
class Nodules:
    inputs: torch.Tensor  # normalised [N, 1, 224, 224]
    frames: list[PreparedFrame]
    lesion_masks: list[np.ndarray]


@pytest.fixture(scope="module")
def nodules() -> Nodules:
    phantoms = held_out_nodules(NODULES)
    frames = [prepare_frames(p.dataset, INPUT_SPEC)[0] for p in phantoms]
    inputs = torch.from_numpy(np.stack([normalise(frame.model_input) for frame in frames]))
    return Nodules(inputs, frames, [p.lesion_mask for p in phantoms])


@pytest.fixture(scope="module")
def classifier() -> DemoNet:
    card = ModelCard.load(demo_card_path())
    model = DemoNet(num_classes=len(card.output.classes))
    weights = demo_card_path().parent / card.weights["torch"].file
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def explainer() -> RealtimeSaliency:
    """The explainer as the node builds it: the masker is the one the demo card names."""
    return RealtimeSaliency(**card_settings(ModelCard.load(demo_card_path()), "realtime_saliency"))  # type: ignore[arg-type]


def test_shipped_masker_is_the_demo_models_and_small() -> None:
    path = ModelCard.load(demo_card_path()).auxiliary_path("saliency_masker")
    assert path.parent == demo_card_path().parent
    assert path.stat().st_size < 2_000_000
    _, info = load_masker(path)
    card = ModelCard.load(demo_card_path())
    assert (info.num_classes, info.in_channels, info.rows, info.columns) == (
        len(card.output.classes),
        card.input.channels,
        card.input.rows,
        card.input.columns,
    )
    assert info.metadata["model"]["torch_sha256"] == card.weights["torch"].sha256


def test_mask_peak_inside_the_nodule_for_most_held_out_phantoms(
    explainer: RealtimeSaliency, nodules: Nodules, classifier: DemoNet
) -> None:
    maps = explainer.explain(classifier, nodules.inputs, [NODULE] * NODULES).numpy()
    assert maps.shape == (NODULES, 224, 224) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    hits = 0
    for frame, lesion, saliency in zip(nodules.frames, nodules.lesion_masks, maps):
        source = frame.mapping.to_source_grid(saliency)
        hits += bool(lesion[np.unravel_index(np.argmax(source), source.shape)])
    rate = hits / NODULES
    print(f"real-time saliency pointing game on {NODULES} held-out nodules: {rate:.0%}")
    assert rate >= 0.7, f"mask peak inside the nodule for only {hits} of {NODULES} held-out phantoms"


def _top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean [N, H, W]: each image's ``fraction`` highest pixels."""
    flat = scores.flatten(1)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen.scatter_(1, flat.topk(round(fraction * flat.shape[1]), dim=1).indices, True)
    return chosen.view_as(scores)


def test_deleting_the_top_mask_region_hurts_more_than_a_random_region(
    explainer: RealtimeSaliency, nodules: Nodules, classifier: DemoNet
) -> None:
    x = nodules.inputs
    maps = explainer.explain(classifier, x, [NODULE] * NODULES)
    # A random region of the same size: contiguous blobs (top pixels of smoothed coarse noise), since
    # scattered single pixels are a different, harsher perturbation than removing one region.
    coarse = torch.rand(NODULES, 1, 7, 7, generator=torch.Generator().manual_seed(3))
    random = F.interpolate(coarse, size=(224, 224), mode="bilinear", align_corners=False)[:, 0]

    def probability(removed: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # removed pixels become mid-grey, the card's mean (0 after normalisation)
            logits = classifier(torch.where(removed[:, None], torch.zeros_like(x), x))
        return torch.softmax(logits, dim=1)[:, NODULE]

    clean = probability(torch.zeros_like(maps, dtype=torch.bool))
    drop_top = clean - probability(_top(maps, DELETED))
    drop_random = clean - probability(_top(random, DELETED))
    print(
        f"nodule probability drop: top {DELETED:.0%} of the mask {drop_top.mean():.3f}, random {drop_random.mean():.3f}"
    )
    assert drop_top.mean() > drop_random.mean() + 0.1
    assert (drop_top > drop_random).float().mean() >= 0.7


def test_batch_equals_single_runs_and_repeats(explainer: RealtimeSaliency, nodules: Nodules) -> None:
    x = nodules.inputs[:3]
    targets = [NODULE, 0, 2]  # mixed targets: each sample gets its own class
    batch = explainer.explain(DemoNet(), x, targets)
    singles = torch.cat([explainer.explain(DemoNet(), x[i : i + 1], [t]) for i, t in enumerate(targets)])
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-5)
    torch.testing.assert_close(explainer.explain(DemoNet(), x, targets), batch, rtol=0, atol=0)
    assert not torch.allclose(batch[0], explainer.explain(DemoNet(), x[:1], [0])[0]), "the class selector is ignored"


class ExplodingRunner:
    """A runner whose forward fails: real-time saliency never calls the classifier."""

    device = "cpu"
    torch_module = None

    def forward(self, batch: np.ndarray) -> np.ndarray:
        raise AssertionError("the classifier was called")


def test_any_runner_works_and_the_model_is_left_as_found(
    explainer: RealtimeSaliency, nodules: Nodules, classifier: DemoNet
) -> None:
    x, targets = nodules.inputs[:2], [NODULE, NODULE]
    onnx = OnnxRunner(str(demo_card_path().parent / "demo.onnx"), device="cpu", threads=2)
    reference = explainer.explain(onnx, x, targets)
    torch.testing.assert_close(explainer.explain(ExplodingRunner(), x, targets), reference, rtol=0, atol=0)
    model = DemoNet()
    model.load_state_dict(classifier.state_dict())
    with left_as_found(model, x, frozen=model.features.stem[0].weight, eval_part=model.features.block2):
        torch.testing.assert_close(explainer.explain(model, x, targets), reference, rtol=0, atol=0)


def test_missing_masker_file_names_the_path_and_the_command(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "saliency-masker.pt"
    with pytest.raises(ExplainerError, match=r"nowhere.*saliency-masker\.pt.*pacs-xai demo train-saliency"):
        RealtimeSaliency(masker=missing)
    with pytest.raises(ExplainerError, match="masker must be a path.*3"):
        RealtimeSaliency(masker=3)  # type: ignore[arg-type]


def test_a_file_that_is_no_masker_is_refused_at_first_use(tmp_path: Path, nodules: Nodules) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    explainer = RealtimeSaliency(masker=path)
    with pytest.raises(ExplainerError, match=r"other\.pt is not a saliency masker file"):
        explainer.explain(DemoNet(), nodules.inputs[:1], [NODULE])


def test_wrong_input_shape_and_targets_are_named(explainer: RealtimeSaliency, nodules: Nodules) -> None:
    with pytest.raises(ExplainerError, match=r"1 x 224 x 224.*got 1 x 64 x 64"):
        explainer.explain(DemoNet(), torch.zeros(1, 1, 64, 64), [NODULE])
    with pytest.raises(ExplainerError, match=r"1 x 224 x 224.*got 3 x 224 x 224"):
        explainer.explain(DemoNet(in_channels=3), torch.zeros(1, 3, 224, 224), [NODULE])
    with pytest.raises(ExplainerError, match=r"targets \[1, 3\] out of range.*3 classes"):
        explainer.explain(DemoNet(), nodules.inputs[:2], [1, 3])
    with pytest.raises(ExplainerError, match=r"4 output classes.*3-class model"):
        explainer.explain(DemoNet(num_classes=4), nodules.inputs[:1], [NODULE])
    with pytest.raises(ExplainerError, match="must be a torch.nn.Module or a Runner, got str"):
        explainer.explain("model", nodules.inputs[:1], [NODULE])  # type: ignore[arg-type]


TINY = SaliencySettings(train_per_class=2, held_out_per_class=1, epochs=1, batch_size=6)


def test_tiny_training_run_writes_a_loadable_deterministic_masker(tmp_path: Path, nodules: Nodules) -> None:
    first = train_saliency_masker(tmp_path / "a", TINY, progress=lambda line: None)
    second = train_saliency_masker(tmp_path / "b", TINY, progress=lambda line: None)
    assert first.path == tmp_path / "a" / "saliency-masker.pt"
    assert all(math.isfinite(value) for value in first.figures.values()), first.figures
    masker_a, info = load_masker(first.path)
    masker_b, _ = load_masker(second.path)
    for (key, a), b in zip(masker_a.state_dict().items(), masker_b.state_dict().values()):
        assert torch.equal(a, b), f"{key} differs between two runs with the same seed"
    assert info.metadata["training"]["epochs"] == 1
    maps = RealtimeSaliency(masker=first.path).explain(ExplodingRunner(), nodules.inputs[:2], [NODULE, 0])
    assert maps.shape == (2, 224, 224) and torch.isfinite(maps).all()


def test_cli_refuses_bad_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "train-saliency", "--out", str(tmp_path), "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "--epochs: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "saliency-masker.pt").exists()


# --- the masker comes from the model card -------------------------------------------------------


def test_without_a_masker_the_error_says_where_to_set_it() -> None:
    with pytest.raises(
        ExplainerError, match=r"set the model card's auxiliary\.saliency_masker .* or the masker setting"
    ):
        RealtimeSaliency()


def test_the_pipeline_takes_the_masker_from_the_card_unless_the_config_sets_one(tmp_path: Path) -> None:
    deployed = DeployedModel.from_card_path(demo_card_path())
    try:
        pipeline = ExplainPipeline(deployed, ["realtime_saliency", "gradcam"])
        explainer = pipeline.explainers["realtime_saliency"]
        assert isinstance(explainer, RealtimeSaliency)
        assert explainer.masker_path == deployed.card.auxiliary_path("saliency_masker")
        own = tmp_path / "own-masker.pt"
        own.write_bytes(explainer.masker_path.read_bytes())
        params = {"realtime_saliency": {"masker": str(own)}, "gradcam": {"target_layer": "features.block2"}}
        configured = ExplainPipeline(deployed, ["realtime_saliency", "gradcam"], method_params=params)
        assert configured.explainers["realtime_saliency"].masker_path == own  # type: ignore[attr-defined]
        assert configured.explainers["gradcam"].target_layer == "features.block2"  # type: ignore[attr-defined]
    finally:
        deployed.close()


def test_a_card_without_a_masker_gives_none_and_the_explainer_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    shutil.copytree(demo_card_path().parent, folder)
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    del raw["auxiliary"]
    (folder / "model.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    settings = card_settings(ModelCard.load(folder), "realtime_saliency")
    assert settings == {}
    with pytest.raises(ExplainerError, match=r"auxiliary\.saliency_masker"):
        get_explainer("realtime_saliency", **settings)


def test_training_into_the_cards_folder_updates_its_entry(tmp_path: Path, nodules: Nodules) -> None:
    folder = tmp_path / "demo"
    shutil.copytree(demo_card_path().parent, folder)
    before = (folder / "saliency-masker.pt").read_bytes()
    report = train_saliency_masker(folder, TINY, progress=lambda line: None, card_path=folder / "model.yaml")
    assert report.card == folder / "model.yaml" and report.path == folder / "saliency-masker.pt"
    assert report.path.read_bytes() != before
    card = ModelCard.load(folder)  # the new file's sha256 checks out
    assert card.auxiliary["saliency_masker"].file == "saliency-masker.pt"
    assert card.auxiliary["saliency_masker"].sha256 == sha256_of(report.path)
    explainer = RealtimeSaliency(**card_settings(card, "realtime_saliency"))  # type: ignore[arg-type]
    assert explainer.explain(ExplodingRunner(), nodules.inputs[:1], [NODULE]).shape == (1, 224, 224)
    # elsewhere the card is left alone
    elsewhere = train_saliency_masker(tmp_path / "other", TINY, progress=lambda line: None, card_path=folder)
    assert elsewhere.card is None
    assert ModelCard.load(folder).auxiliary["saliency_masker"].sha256 == sha256_of(report.path)
