"""Registry names -> explainer classes.

The table is a read-only mapping built from explicit imports: adding a method means adding one
line here, and nothing can change the registry at run time.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType

from service.explain.base import Explainer, ExplainerError
from service.explain.methods.cam import CAM, GradCAM, GradCAMPlusPlus, GuidedGradCAM, ScoreCAM
from service.explain.methods.gradient import (
    Deconvnet,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from service.explain.methods.occlusion import Occlusion
from service.explain.methods.optimisation import ExtremalPerturbation, MeaningfulPerturbation
from service.explain.methods.perturbation import RISE, HiPe
from service.explain.methods.propagation import LRP, DeepLift
from service.explain.methods.realtime import RealtimeSaliency
from service.explain.methods.surrogate import KernelShap, Lime

_EXPLAINERS: Mapping[str, type[Explainer]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            GradCAM,
            Occlusion,
            CAM,
            GradCAMPlusPlus,
            ScoreCAM,
            GuidedGradCAM,
            RISE,
            HiPe,
            Lime,
            KernelShap,
            Saliency,
            InputXGradient,
            IntegratedGradients,
            SmoothGrad,
            GuidedBackprop,
            Deconvnet,
            DeepLift,
            LRP,
            MeaningfulPerturbation,
            ExtremalPerturbation,
            RealtimeSaliency,
        )
    }
)


def available_explainers() -> tuple[str, ...]:
    """The registry names, sorted."""
    return tuple(sorted(_EXPLAINERS))


def explainer_class(name: str) -> type[Explainer]:
    """The class registered as ``name``; a clear error listing the names when there is none."""
    try:
        return _EXPLAINERS[name]
    except KeyError:
        raise ExplainerError(f"unknown explainer {name!r}; available: {', '.join(available_explainers())}") from None


def get_explainer(name: str, **params: object) -> Explainer:
    """A configured explainer; ``params`` go to the method's constructor and are validated there."""
    cls = explainer_class(name)
    settings = [
        parameter.name
        for parameter in inspect.signature(cls).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]
    unknown = sorted(set(params) - set(settings))
    if unknown:
        known = ", ".join(settings) if settings else "none"
        raise ExplainerError(
            f"unknown setting(s) {', '.join(repr(u) for u in unknown)} for explainer {name!r}; "
            f"its settings are: {known}"
        )
    try:
        return cls(**params)
    except TypeError as exc:
        raise ExplainerError(f"bad settings for explainer {name!r}: {exc}") from exc
