"""Registry names -> explainer classes, and configured explainers built from names and settings.

The table is a read-only mapping built from explicit imports: adding a method means adding one
line here, and nothing can change the registry at run time. :func:`get_explainer` turns a
configuration (a name and settings, as in the node config's ``explain.method_params``) into an
explainer, building the instances that wrapper methods take from their names (see
:class:`~service.explain.base.WrappedExplainer`). The methods never import this module.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType

from service.explain.base import Explainer, ExplainerError, WrappedExplainer
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
from service.explain.methods.optimisation import ExtremalPerturbation, HealthyPerturbation, MeaningfulPerturbation
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
            HealthyPerturbation,
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
    """A configured explainer; ``params`` go to the method's constructor and are validated there.

    A wrapper method's settings that take an explainer instance (:attr:`Explainer.wraps`, e.g.
    SmoothGrad's ``base``) are given as a configuration gives them: the wrapped method's registry
    name (the wrapper's default when left out) and its own settings under ``<setting>_params``,
    e.g. ``get_explainer("smoothgrad", base="integrated_gradients", base_params={"steps": 32})``.
    The wrapped explainer is built here first (its settings validated by its own constructor); an
    explainer instance given instead is passed on as it is.
    """
    cls = explainer_class(name)
    settings = [
        parameter.name
        for parameter in inspect.signature(cls).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]
    settings += [_params_key(setting) for setting in cls.wraps]
    unknown = sorted(set(params) - set(settings))
    if unknown:
        known = ", ".join(settings) if settings else "none"
        raise ExplainerError(
            f"unknown setting(s) {', '.join(repr(u) for u in unknown)} for explainer {name!r}; "
            f"its settings are: {known}"
        )
    params = dict(params)
    for setting, wrapped in cls.wraps.items():
        params[setting] = _wrapped_explainer(
            setting, wrapped, params.get(setting), params.pop(_params_key(setting), None)
        )
    try:
        return cls(**params)
    except TypeError as exc:
        raise ExplainerError(f"bad settings for explainer {name!r}: {exc}") from exc


def _params_key(setting: str) -> str:
    """The configuration key of a wrapped method's own settings: ``base`` -> ``base_params``."""
    return f"{setting}_params"


def _can_wrap(wrapped: WrappedExplainer, cls: type[Explainer]) -> bool:
    return issubclass(cls, wrapped.accepts) and not cls.wraps


def _wrapped_explainer(setting: str, wrapped: WrappedExplainer, value: object, settings: object) -> Explainer:
    """The explainer instance for a wrapper's ``setting``, from a registry name and its settings."""
    if isinstance(value, Explainer):
        if settings is not None:
            raise ExplainerError(
                f"{_params_key(setting)} applies to a {setting} given by name; {setting} is already "
                f"an explainer ({type(value).__name__}), so give it its settings itself"
            )
        return value
    name = wrapped.default if value is None else value
    if not isinstance(name, str):
        raise ExplainerError(f"{setting} must be a registry name or an explainer, got {name!r}")
    if not _can_wrap(wrapped, explainer_class(name)):
        names = ", ".join(key for key, cls in _EXPLAINERS.items() if _can_wrap(wrapped, cls))
        raise ExplainerError(f"{setting} must name {wrapped.description} ({names}), got {name!r}")
    if settings is not None and not isinstance(settings, Mapping):
        raise ExplainerError(f"{_params_key(setting)} must be a mapping of settings, got {settings!r}")
    return get_explainer(name, **(settings or {}))
