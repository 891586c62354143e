"""Explainers: one class per saliency method, looked up by registry name.

from service.explain import get_explainer
maps = get_explainer("gradcam").explain(model, batch, targets)   # [B, H, W] float32
"""

from service.explain.base import Explainer, ExplainerError
from service.explain.registry import available_explainers, explainer_class, get_explainer

__all__ = ["Explainer", "ExplainerError", "available_explainers", "explainer_class", "get_explainer"]
