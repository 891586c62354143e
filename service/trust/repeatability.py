"""Would the heatmap come out the same again? Repeatability over seeds and over model paths.

- :func:`seed_repeatability`: a stochastic method (any registry method with a ``seed`` setting:
  ``rise``, ``lime``, ``kernel_shap``, ``smoothgrad``, ...) explains the same inputs once per seed;
  per sample, the mean over all pairs of seeds of the Spearman rank correlation (absolute maps)
  and of the SSIM (min-max-normalised absolute maps), as in :mod:`service.trust.similarity`.
  Near 1: the seed barely matters; low: a single map says little.
- :func:`model_path_agreement`: a forward-only method (``needs_gradients = False``) explains the
  same inputs through two model paths, e.g. the ONNX runner behind the inference pool and the
  eager torch module of the same card; per sample, the maximum absolute difference of the maps
  (the method's own units) and their Pearson correlation. The node computes a map through the
  pool; this says how far that map is from the torch reference.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.explain import Explainer, explainer_class, get_explainer
from service.explain.base import ModelLike
from service.trust.checks import TrustMetricError, as_numpy, class_indices
from service.trust.similarity import pearson, spearman, ssim

__all__ = ["PathAgreement", "SeedRepeatability", "model_path_agreement", "seed_repeatability", "stochastic"]

#: Seeds compared by default.
SEEDS: tuple[int, ...] = (0, 1, 2)


def stochastic(method: str) -> bool:
    """True when the registry method ``method`` takes a ``seed`` setting."""
    return "seed" in inspect.signature(explainer_class(method)).parameters


@dataclass(frozen=True)
class SeedRepeatability:
    """Mean pairwise similarity over seeds, per sample (``[B]`` each)."""

    method: str
    seeds: tuple[int, ...]
    spearman: np.ndarray
    ssim: np.ndarray


def seed_repeatability(
    model: ModelLike,
    method: str,
    batch: torch.Tensor,
    targets: Sequence[int],
    *,
    seeds: Sequence[int] = SEEDS,
    settings: Mapping[str, Any] | None = None,
) -> SeedRepeatability:
    """Maps of ``method`` (with ``settings``) once per seed; mean pairwise Spearman and SSIM per sample."""
    if not stochastic(method):
        raise TrustMetricError(f"{method!r} takes no seed setting: it is deterministic, there is nothing to repeat")
    chosen = tuple(seeds)
    if len(set(chosen)) < 2 or len(set(chosen)) != len(chosen):
        raise TrustMetricError(f"need at least 2 distinct seeds, got {list(seeds)!r}")
    extra = dict(settings or {})
    if "seed" in extra:
        raise TrustMetricError(f"give the seeds in seeds, not in settings (got seed={extra['seed']!r})")
    class_indices(targets, batch.shape[0])
    maps = [get_explainer(method, seed=seed, **extra).explain(model, batch, targets) for seed in chosen]
    pairs = list(itertools.combinations(range(len(chosen)), 2))
    return SeedRepeatability(
        method,
        chosen,
        np.mean([spearman(maps[i], maps[j]) for i, j in pairs], axis=0),
        np.mean([ssim(maps[i], maps[j]) for i, j in pairs], axis=0),
    )


@dataclass(frozen=True)
class PathAgreement:
    """How far the maps of one model path are from another's, per sample (``[B]`` each)."""

    max_abs_difference: np.ndarray
    pearson: np.ndarray


def model_path_agreement(
    explainer: Explainer,
    model: ModelLike,
    reference_model: ModelLike,
    batch: torch.Tensor,
    targets: Sequence[int],
) -> PathAgreement:
    """The maps of a forward-only ``explainer`` through ``model`` (e.g. the ONNX pool) against ``reference_model``
    (e.g. the eager torch module)."""
    if explainer.needs_gradients:
        raise TrustMetricError(
            f"{explainer.name} needs gradients, so it runs on the torch module only: compare model paths "
            "with a forward-only method (occlusion, rise, lime, ...)"
        )
    class_indices(targets, batch.shape[0])
    maps = as_numpy(explainer.explain(model, batch, targets)).astype(np.float64)
    reference = as_numpy(explainer.explain(reference_model, batch, targets)).astype(np.float64)
    difference = np.abs(maps - reference).reshape(len(maps), -1).max(axis=1)
    return PathAgreement(difference, pearson(maps, reference))
