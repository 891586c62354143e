"""The explainer contract, checked for every registry entry on four model shapes, 2D and 3D.

Parametrised over :func:`available_explainers` (a method added to the registry is checked here
without editing this file, except for its fast settings in :data:`FAST`) and over

- ``demo``: the shipped demo model at 224² (two phantoms: a nodule, an effusion),
- ``densenet``: densely connected blocks with concatenation and in-place ReLUs,
- ``residual``: a ResNet basic block whose one ReLU module is called three times,
- ``volume``: the same in 3D on volumes ``[B, 1, D, H, W]``; every method that declares
  ``supports_volumes`` must give ``[B, D, H, W]`` maps under the same contract, the others must
  refuse the volume with a clear error.

The contract (``service/explain/base.py`` and DESIGN.md): ``[B, H, W]`` float32 finite maps; a
batch with per-sample targets equals the single runs; deterministic; the model comes back as it
was given (modes, ``requires_grad``, no ``.grad``, no hooks, same outputs), also when the forward
pass raises; forward-only methods run on a runner without a torch module and give the module's
maps, gradient methods refuse such a runner with a clear error; a target outside the model's
classes is a clear error. Method-specific references and axioms live in the other explainer tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dicom_io.pixels import prepare_frames
from service.explain.base import Explainer, ExplainerError
from service.explain.registry import available_explainers, explainer_class, get_explainer
from service.inference.card import ModelCard
from service.inference.deployed import DeployedModel
from service.inference.runner import Runner
from service.models import demo_card_path
from service.node.pipeline import card_settings
from service.synthetic.phantoms import make_phantom
from tests.helpers import HELD_OUT_SEED
from tests.unit.service.explain.explainer_checks import hook_count, left_as_found
from tests.unit.service.explain.explainer_models import (
    DenseNetLike,
    ModuleRunner,
    ResidualNet,
    VolumeNet,
    build,
    function_modes,
    images,
    volumes,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

#: Cheap settings per method, so that every method runs on every model in seconds. Every
#: registry name must appear here (checked below); the settings are the method's own validation.
FAST: dict[str, dict[str, Any]] = {
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {"steps": 8, "internal_batch_size": 5},
    "smoothgrad": {"samples": 4, "internal_batch_size": 5, "seed": 3},
    "guided_backprop": {},
    "deconvnet": {},
    "deeplift": {},
    "lrp": {},
    "cam": {},
    "gradcam": {"relu": False},  # signed, so no map is all zero
    "gradcam_pp": {},
    "scorecam": {"chunk_size": 7},
    "guided_gradcam": {},
    "occlusion": {"window": 8, "stride": 8, "chunk_size": 5},  # chunks span images
    "rise": {"masks": 24, "cell_size": 4, "chunk_size": 10, "seed": 5},
    "hipe": {"initial_grid": 4, "chunk_size": 10},
    "lime": {"samples": 40, "n_segments": 12, "chunk_size": 16, "seed": 2},
    "kernel_shap": {"samples": 40, "n_segments": 12, "chunk_size": 16, "seed": 2},
    "meaningful_perturbation": {"iterations": 6, "seed": 1},
    "extremal_perturbation": {"iterations": 6, "seed": 1},
    # the masker trained for the demo model, as the node takes it from the demo card
    "realtime_saliency": card_settings(ModelCard.load(demo_card_path()), "realtime_saliency"),
    # the healthy-appearance VAE trained at the demo card's grid, as the node takes it from the card;
    # the logit score: with the probability, Adam's normalised first steps turn the classifier's
    # batch rounding (~1e-7, a gradient near zero) into mask steps of the full learning rate on the
    # demo phantoms (meaningful_perturbation with its blur does the same at seed 2)
    "healthy_perturbation": {
        "iterations": 6,
        "seed": 1,
        "score": "logit",
        **card_settings(ModelCard.load(demo_card_path()), "healthy_perturbation"),
    },
}
#: Where the demo model's 224² images would make the settings above slow.
FAST_ON_DEMO: dict[str, dict[str, Any]] = {
    "occlusion": {"window": 56, "stride": 56, "chunk_size": 5},
    "hipe": {"initial_grid": 4, "min_window": 56, "chunk_size": 10},
    "scorecam": {"chunk_size": 16},
    "lime": {"samples": 16, "n_segments": 8, "chunk_size": 16, "seed": 2},
    "kernel_shap": {"samples": 16, "n_segments": 8, "chunk_size": 16, "seed": 2},
    "extremal_perturbation": {"iterations": 3, "seed": 1},
}

#: Methods whose map is made without calling the classifier (a masking network trained for the
#: demo model): they cannot fail inside the classifier's forward pass.
NEVER_CALLS_MODEL = {"realtime_saliency"}
#: Methods that apply to the demo model only; elsewhere they must refuse with a clear error.
DEMO_ONLY = {"realtime_saliency", "healthy_perturbation"}

#: Methods that optimise a mask over steps.
ITERATIVE = {"meaningful_perturbation", "extremal_perturbation", "healthy_perturbation"}

#: The methods that take ``perturbation: healthy`` (filled from the demo card's healthy-appearance
#: VAE, so on the demo model only), each with the contract below: see test_healthy_fill_contract.
HEALTHY_FILL = ("occlusion", "rise", "hipe", "extremal_perturbation")

METHODS = available_explainers()
SHAPES = ("demo", "densenet", "residual", "volume")


@dataclass
class Case:
    """A model, a batch of 3 images, per-sample targets (not all equal) and a runner on the same model."""

    model: nn.Module
    batch: torch.Tensor
    targets: list[int]
    runner: Runner
    #: Late module where the exception test raises, and an early one left in eval mode by the
    #: model-as-found test.
    late: nn.Module
    early: nn.Module


@pytest.fixture(scope="module")
def deployed_demo() -> Iterator[DeployedModel]:
    deployed = DeployedModel.from_card_path(demo_card_path())
    yield deployed
    deployed.close()


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: small models gain nothing from more, and results stay reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def demo_case(deployed: DeployedModel) -> Case:
    """Three held-out phantoms (nodule, effusion, normal) with targets nodule, effusion, nodule."""
    card = deployed.card
    kinds = ("nodule", "effusion", "normal")
    phantoms = [make_phantom(i, kind, seed=HELD_OUT_SEED, cols=320) for i, kind in enumerate(kinds)]
    frames = [prepare_frames(p.dataset, card.input.spec())[0] for p in phantoms]
    batch = torch.from_numpy(deployed.normalise(np.stack([frame.model_input for frame in frames])))
    classes = card.output.classes
    targets = [classes.index("nodule"), classes.index("effusion"), classes.index("nodule")]
    model = deployed.gradient_runner.torch_module
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return Case(model, batch, targets, deployed.forward_runner, late=convs[-1], early=convs[0])


def make_case(shape: str, deployed: DeployedModel) -> Case:
    if shape == "demo":
        return demo_case(deployed)
    if shape == "densenet":
        model = build(DenseNetLike, inplace=True)
        return Case(model, images(3), [0, 2, 1], ModuleRunner(model), late=model.layers[2], early=model.stem)
    if shape == "volume":
        model = build(VolumeNet)
        return Case(model, volumes(3), [0, 2, 1], ModuleRunner(model), late=model.conv2, early=model.stem)
    model = build(ResidualNet, "reused")
    return Case(model, images(3), [0, 2, 1], ModuleRunner(model), late=model.conv2, early=model.stem)


def explainer(method: str, case: Case) -> Explainer:
    settings = FAST_ON_DEMO if case.batch.shape[-1] == 224 else FAST
    return get_explainer(method, **settings.get(method, FAST.get(method, {})))


@pytest.fixture(params=SHAPES)
def case(request: pytest.FixtureRequest, deployed_demo: DeployedModel) -> Case:
    return make_case(request.param, deployed_demo)


def applies(method: str, case: Case, deployed: DeployedModel) -> bool:
    """False where the method must refuse the model or the volume (and the test checks the refusal)."""
    if case.batch.ndim == 5 and not explainer_class(method).supports_volumes:
        return False
    return method not in DEMO_ONLY or case.model is deployed.gradient_runner.torch_module


# --- the contract ---------------------------------------------------------------------------------


def test_every_registry_entry_has_fast_settings() -> None:
    assert set(METHODS) <= set(FAST), f"add fast settings for {sorted(set(METHODS) - set(FAST))}"


@pytest.mark.parametrize("method", METHODS)
def test_maps_batch_contract_and_determinism(method: str, case: Case, deployed_demo: DeployedModel) -> None:
    """Shape and dtype; finite and not constant; batch == singles; two runs give the same maps."""
    if not applies(method, case, deployed_demo):
        refusal = "works on images" if case.batch.ndim == 5 else ""
        with pytest.raises(ExplainerError, match=refusal):
            explainer(method, case).explain(case.model, case.batch, case.targets)
        return
    batched = explainer(method, case).explain(case.model, case.batch, case.targets)
    b, _, *spatial = case.batch.shape
    assert batched.shape == (b, *spatial) and batched.dtype == torch.float32
    assert torch.isfinite(batched).all()
    # A rectified map may be all zero for one sample (no evidence for its target), not for all.
    assert any(float(m.max() - m.min()) > 0 for m in batched), "constant maps say nothing"
    singles = torch.cat(
        [explainer(method, case).explain(case.model, case.batch[i : i + 1], [t]) for i, t in enumerate(case.targets)]
    )
    scale = max(1.0, float(singles.abs().max()))
    # Iterative optimisation carries the float32 rounding of batched convolutions (~1e-6) through
    # its steps; one-shot methods stay at that rounding.
    tolerance = 1e-4 if method in ITERATIVE else 2e-5
    torch.testing.assert_close(batched, singles, rtol=0, atol=tolerance * scale)
    assert torch.equal(explainer(method, case).explain(case.model, case.batch, case.targets), batched)


@pytest.mark.parametrize("method", METHODS)
def test_model_left_as_found(method: str, case: Case, deployed_demo: DeployedModel) -> None:
    """Modes, requires_grad, .grad, hooks, batch-norm statistics and outputs as before."""
    if not applies(method, case, deployed_demo):
        pytest.skip("refused on this model (checked above)")
    first = next(case.model.parameters())
    with left_as_found(case.model, case.batch, frozen=first, eval_part=case.early):
        explainer(method, case).explain(case.model, case.batch, case.targets)
    first.requires_grad_(True)
    case.model.eval()
    assert function_modes() == 0


@pytest.mark.parametrize("method", METHODS)
def test_exception_in_forward_releases_everything(method: str, case: Case, deployed_demo: DeployedModel) -> None:
    """A forward pass that raises: the error reaches the caller; hooks, modes, grad mode restored."""
    if not applies(method, case, deployed_demo):
        pytest.skip("refused on this model (checked above)")

    def boom(module: nn.Module, inputs: object, output: object) -> None:
        raise RuntimeError("boom")

    case.model.train()
    handle = case.late.register_forward_hook(boom)
    try:
        if method in NEVER_CALLS_MODEL:
            explainer(method, case).explain(case.model, case.batch, case.targets)  # the classifier is never run
        else:
            with pytest.raises(RuntimeError, match="boom"):
                explainer(method, case).explain(case.model, case.batch, case.targets)
    finally:
        handle.remove()
    assert hook_count(case.model) == 0 and function_modes() == 0
    assert all(m.training for m in case.model.modules())
    assert all(p.grad is None for p in case.model.parameters())
    assert torch.is_grad_enabled()
    case.model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_runner_without_torch_module(method: str, case: Case, deployed_demo: DeployedModel) -> None:
    """Forward-only methods give the module's maps through a runner (ONNX Runtime for the demo);
    gradient methods say that they need gradients."""
    if not applies(method, case, deployed_demo):
        pytest.skip("refused on this model (checked above)")
    assert case.runner.torch_module is None
    if explainer_class(method).needs_gradients:
        with pytest.raises(ExplainerError, match=f"{method} needs (gradients|the activations of a torch module)"):
            explainer(method, case).explain(case.runner, case.batch, case.targets)
        return
    on_runner = explainer(method, case).explain(case.runner, case.batch, case.targets)
    on_module = explainer(method, case).explain(case.model, case.batch, case.targets)
    # ONNX Runtime and torch round differently (~1e-6 of the logits); surrogate fits and masks
    # amplify that a little, never to a different map.
    torch.testing.assert_close(on_runner, on_module, rtol=0, atol=1e-3 * max(1e-6, float(on_module.abs().max())))


@pytest.mark.parametrize("method", METHODS)
def test_target_outside_the_classes_is_refused(method: str, case: Case, deployed_demo: DeployedModel) -> None:
    if case.batch.ndim == 5 and not explainer_class(method).supports_volumes:
        pytest.skip("refuses volumes (checked above)")
    with pytest.raises(ExplainerError, match="3"):
        explainer(method, case).explain(case.model, case.batch[:1], [3])


@pytest.mark.parametrize("method", METHODS)
def test_unknown_setting_is_refused(method: str) -> None:
    with pytest.raises(ExplainerError, match="no_such_setting"):
        get_explainer(method, no_such_setting=1)


# --- perturbation: healthy ------------------------------------------------------------------------


@pytest.mark.parametrize("method", HEALTHY_FILL)
def test_healthy_fill_contract(method: str, deployed_demo: DeployedModel) -> None:
    """``perturbation: healthy`` on the demo model: batch == singles, deterministic, the model left
    as found, a different map from the constant fill's (the fill is used), and for forward-only
    methods the same map on ONNX Runtime (h(x) there from the ONNX export) as on torch."""
    case = demo_case(deployed_demo)
    fast = FAST_ON_DEMO.get(method, FAST[method])
    healthy = {**fast, **card_settings(deployed_demo.card, method), "perturbation": "healthy"}
    first = next(case.model.parameters())
    with left_as_found(case.model, case.batch, frozen=first, eval_part=case.early):
        batched = get_explainer(method, **healthy).explain(case.model, case.batch, case.targets)
    first.requires_grad_(True)
    case.model.eval()
    assert batched.shape == (3, 224, 224) and torch.isfinite(batched).all()
    singles = torch.cat(
        [
            get_explainer(method, **healthy).explain(case.model, case.batch[i : i + 1], [t])
            for i, t in enumerate(case.targets)
        ]
    )
    tolerance = (1e-4 if method in ITERATIVE else 2e-5) * max(1.0, float(singles.abs().max()))
    torch.testing.assert_close(batched, singles, rtol=0, atol=tolerance)
    assert torch.equal(get_explainer(method, **healthy).explain(case.model, case.batch, case.targets), batched)
    constant = get_explainer(method, **fast).explain(case.model, case.batch, case.targets)
    assert not torch.allclose(batched, constant, atol=1e-3 * float(constant.abs().max()))
    if not explainer_class(method).needs_gradients:
        on_runner = get_explainer(method, **healthy).explain(case.runner, case.batch, case.targets)
        torch.testing.assert_close(on_runner, batched, rtol=0, atol=1e-3 * max(1e-6, float(batched.abs().max())))
