"""The registry (service/explain/registry.py) builds wrapper methods from a configuration: the
wrapped method by name with its own settings, as the node config gives them; the methods take
instances and never import the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from service.explain.base import Explainer, ExplainerError
from service.explain.methods.gradient import InputAttribution, IntegratedGradients, Saliency, SmoothGrad
from service.explain.methods.occlusion import Occlusion
from service.explain.methods.propagation import DeepLift
from service.explain.registry import available_explainers, explainer_class, get_explainer
from tests.unit.service.explain.explainer_models import DenseNetLike, build, images

EXPLAIN = Path(__file__).resolve().parents[4] / "service" / "explain"


def test_a_wrapper_from_names_equals_the_wrapper_of_instances() -> None:
    model, x, targets = build(DenseNetLike), images(2), [0, 2]
    configured = get_explainer(
        "smoothgrad", base="integrated_gradients", base_params={"steps": 4}, samples=3, variant="vargrad"
    )
    assert isinstance(configured, SmoothGrad) and isinstance(configured.base_explainer, IntegratedGradients)
    assert configured.base_explainer.steps == 4
    direct = SmoothGrad(IntegratedGradients(steps=4), samples=3, variant="vargrad")
    assert torch.equal(configured.explain(model, x, targets), direct.explain(model, x, targets))


def test_the_default_base_is_the_vanilla_gradient() -> None:
    explainer = get_explainer("smoothgrad", base_params={"absolute": False})
    assert isinstance(explainer, SmoothGrad) and type(explainer.base_explainer) is Saliency
    assert explainer.base_explainer.absolute is False
    assert type(get_explainer("smoothgrad").base_explainer) is Saliency


def test_an_instance_is_passed_on_as_it_is() -> None:
    base = DeepLift(baseline=0.25)
    assert get_explainer("smoothgrad", base=base, samples=2).base_explainer is base
    with pytest.raises(ExplainerError, match=r"base_params applies to a base given by name.*DeepLift"):
        get_explainer("smoothgrad", base=base, base_params={"baseline": 0.5})
    with pytest.raises(ExplainerError, match="base must be a registry name or an explainer, got 3"):
        get_explainer("smoothgrad", base=3)


def test_the_names_a_wrapper_accepts_are_listed() -> None:
    accepted = [
        "saliency",
        "input_x_gradient",
        "integrated_gradients",
        "guided_backprop",
        "deconvnet",
        "deeplift",
        "lrp",
    ]
    assert all(issubclass(explainer_class(name), InputAttribution) for name in accepted)
    with pytest.raises(ExplainerError) as error:
        get_explainer("smoothgrad", base="gradcam")
    assert f"({', '.join(accepted)}), got 'gradcam'" in str(error.value)


def test_unknown_settings_list_the_wrapped_methods_settings_key() -> None:
    with pytest.raises(ExplainerError, match=r"its settings are: base, samples, .*, base_params"):
        get_explainer("smoothgrad", steps=4)


def test_the_constructor_refuses_what_it_cannot_wrap() -> None:
    for base in (Occlusion(), SmoothGrad(Saliency()), "saliency"):
        with pytest.raises(ExplainerError, match=r"base must be an explainer that attributes to the input pixels"):
            SmoothGrad(base)  # type: ignore[arg-type]


def test_every_registry_entry_builds_with_its_defaults() -> None:
    for name in available_explainers():
        if name == "realtime_saliency":
            continue  # needs its masker file (the model card's, see test_explainer_realtime)
        if name == "healthy_perturbation":  # needs its VAE file, and says where it comes from
            with pytest.raises(ExplainerError, match=r"auxiliary\.healthy_appearance.*pacs-xai demo train-healthy"):
                get_explainer(name)
            continue
        assert isinstance(get_explainer(name), explainer_class(name))


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_methods_never_import_the_registry() -> None:
    for path in sorted((EXPLAIN / "methods").glob("*.py")):
        assert "service.explain.registry" not in _imports(ast.parse(path.read_text())), path.name


def test_no_project_import_is_hidden_inside_a_function() -> None:
    """Imports of project modules sit at the top of every service/explain module."""
    for path in sorted(EXPLAIN.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                hidden = [name for name in _imports(function) if name.split(".")[0] in ("service", "dicom_io")]
                assert not hidden, f"{path.name}: {function.name} imports {hidden}"


def test_wrapped_settings_are_declared_on_the_class() -> None:
    wrappers = {name: explainer_class(name).wraps for name in available_explainers() if explainer_class(name).wraps}
    assert set(wrappers) == {"smoothgrad"}
    assert wrappers["smoothgrad"]["base"].default == "saliency"
    assert issubclass(wrappers["smoothgrad"]["base"].accepts, Explainer)
