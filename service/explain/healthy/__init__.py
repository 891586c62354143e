"""Healthy-appearance replacement (Uzunova et al. 2019): a VAE trained on normal images and the
operator h(x) that perturbation methods fill removed regions from."""

from service.explain.healthy.appearance import (
    CARD_ENTRY,
    HEALTHY_FILE,
    ONNX_CARD_ENTRY,
    ONNX_FILE,
    HealthyAppearance,
    HealthyModelInfo,
    configured_healthy,
    load_healthy_model,
    save_healthy_model,
)
from service.explain.healthy.network import HealthyAppearanceNet, HealthyVAE

__all__ = [
    "CARD_ENTRY",
    "HEALTHY_FILE",
    "ONNX_FILE",
    "HealthyAppearance",
    "HealthyAppearanceNet",
    "HealthyModelInfo",
    "ONNX_CARD_ENTRY",
    "HealthyVAE",
    "configured_healthy",
    "load_healthy_model",
    "save_healthy_model",
]
