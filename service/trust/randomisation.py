"""Does the heatmap depend on what the model learned? Sanity checks by randomisation.

Cascading model parameter randomisation (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018), :func:`cascading_randomisation`: on a deep copy of the model (the model itself is
left as found), the layers are re-initialised one after another from the top (the output head
first, then each feature block going down), and after each step the same explainer explains the
same inputs and targets. Each step's maps are compared with the trained model's by
:func:`~service.trust.similarity.ssim` (min-max-normalised absolute maps) and
:func:`~service.trust.similarity.spearman` (absolute maps), per sample.

- Layer order (:func:`randomisation_order`): the model's units in reverse registration order (a
  network registers its modules input first, so reversed is head first). A unit is a child module
  that holds parameters: a parametrised leaf (``Linear``, ``Conv2d``, ``BatchNorm2d``) or a named
  block (any other module, e.g. a ResNet ``BasicBlock`` or a ``Sequential`` of leaves such as the
  demo model's ``conv-bn-relu``). Containers (``Sequential``, ``ModuleList``, ``ModuleDict``) of
  blocks are looked into, not taken whole. For the demo model: ``classifier``,
  ``features.block4``, ``features.block3``, ``features.block2``, ``features.block1``,
  ``features.stem``. Where a model registers its modules in another order than its forward pass
  runs them, the caller gives the order instead (``layers``, names from the top).
- Re-initialisation: every submodule of the unit with a ``reset_parameters`` method, in reverse
  module order, gets PyTorch's default initialisation (BatchNorm: weight 1, bias 0, running
  statistics 0 and 1), with the random generator seeded with ``seed + 1`` before each one. That
  is Quantus' ``MPRT`` scheme (``layer_order="top_down"``), which steps through the same leaves in
  the same order one at a time, so at the end of each of our steps the copy equals Quantus' at the
  unit's last leaf for the same seed. The global random state is restored afterwards.
- Baseline (Arun et al., "Assessing the Trustworthiness of Saliency Maps for Localizing
  Abnormalities in Medical Imaging", Radiology: AI 2021), :func:`ssim_baseline`: the mean SSIM of
  50 random pairs (drawn from ``seed``, without replacement; all pairs when there are fewer) of the
  trained model's maps of different images: how alike two unrelated maps of this method are.
- Verdict: a method passes when, once the head and the last feature block are randomised (the
  first ``verdict_after = 2`` steps), its mean SSIM to the trained maps is no higher than the
  baseline. The fully randomised end point alone does not separate methods: edge-detector-like
  methods lose their similarity there too, late.

Random-logit check (Sixt et al., "When Explanations Lie", ICML 2020; Quantus' ``RandomLogit``),
:func:`random_logit`: the map for another class, drawn at random from ``seed`` (uniformly among the
classes other than the target), compared with the map for the target by SSIM and Spearman. A
class-sensitive method gives dissimilar maps.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from service.explain.base import forward_function
from service.trust.checks import Array, TrustMetricError, class_indices, map_batch
from service.trust.similarity import spearman, ssim

__all__ = [
    "BASELINE_PAIRS",
    "CascadingRandomisation",
    "MapExplainer",
    "RandomLogit",
    "RandomisationStep",
    "cascading_randomisation",
    "random_logit",
    "randomisation_order",
    "randomised_models",
    "ssim_baseline",
]

#: Pairs of trained maps in the SSIM baseline (Arun et al. 2021).
BASELINE_PAIRS = 50
#: Steps after which the verdict is taken: the head and the last feature block randomised.
VERDICT_AFTER = 2

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class MapExplainer(Protocol):
    """What the checks need of an explainer (:class:`service.explain.Explainer` is one)."""

    def explain(self, model: nn.Module, batch: torch.Tensor, targets: Sequence[int]) -> torch.Tensor: ...


def randomisation_order(model: nn.Module) -> list[str]:
    """The units of ``model`` from the top (head first), as re-initialised by :func:`randomised_models`."""
    units = _units(model, "")
    if not units:
        raise TrustMetricError(f"{type(model).__name__} has no parametrised layers to randomise")
    return units[::-1]


def _units(module: nn.Module, prefix: str) -> list[str]:
    names: list[str] = []
    for name, child in module.named_children():
        if next(child.parameters(), None) is None:
            continue
        grandchildren = list(child.children())
        if isinstance(child, _CONTAINERS) and any(next(g.children(), None) is not None for g in grandchildren):
            names.extend(_units(child, f"{prefix}{name}."))
        else:
            names.append(f"{prefix}{name}")
    return names


def randomised_models(
    model: nn.Module, layers: Sequence[str] | None = None, *, seed: int = 0
) -> Iterator[tuple[str, nn.Module]]:
    """One deep copy of ``model`` with ``layers`` (default :func:`randomisation_order`) re-initialised
    cumulatively: after the ``k``-th yield the first ``k`` layers are random. The same copy is
    yielded each time, changed in place."""
    if not isinstance(model, nn.Module):
        raise TrustMetricError(f"randomisation needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TrustMetricError(f"seed must be an integer >= 0, got {seed!r}")
    order = list(layers) if layers is not None else randomisation_order(model)
    randomised = copy.deepcopy(model)
    modules = dict(randomised.named_modules())
    unknown = [name for name in order if name not in modules]
    if unknown:
        raise TrustMetricError(f"layers {unknown} are not modules of {type(model).__name__}")
    for name in order:
        resettable = [m for _, m in reversed(list(modules[name].named_modules())) if hasattr(m, "reset_parameters")]
        if not resettable:
            raise TrustMetricError(f"layer {name!r} has nothing to re-initialise (no reset_parameters in it)")
        devices = sorted({p.device.index or 0 for p in modules[name].parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for module in resettable:
                torch.manual_seed(seed + 1)
                module.reset_parameters()
        yield name, randomised


@dataclass(frozen=True)
class RandomisationStep:
    """The maps after randomising the layers up to ``layer``, compared with the trained maps (``[B]`` each)."""

    layer: str
    ssim: np.ndarray
    spearman: np.ndarray


@dataclass(frozen=True)
class CascadingRandomisation:
    """Per-step similarities, the SSIM baseline and the verdict."""

    steps: tuple[RandomisationStep, ...]
    baseline_ssim: float
    verdict_after: int = VERDICT_AFTER

    @property
    def mean_ssim(self) -> np.ndarray:
        """Mean SSIM over the samples, per step ``[S]``."""
        return np.array([step.ssim.mean() for step in self.steps])

    @property
    def mean_spearman(self) -> np.ndarray:
        """Mean Spearman correlation over the samples, per step ``[S]``."""
        return np.array([step.spearman.mean() for step in self.steps])

    @property
    def verdict_ssim(self) -> float:
        """Mean SSIM once the first ``verdict_after`` layers (head and last block) are randomised."""
        return float(self.mean_ssim[self.verdict_after - 1])

    @property
    def passes(self) -> bool:
        """True when :attr:`verdict_ssim` is no higher than :attr:`baseline_ssim`."""
        return self.verdict_ssim <= self.baseline_ssim


def cascading_randomisation(
    model: nn.Module,
    explainer: MapExplainer,
    batch: torch.Tensor,
    targets: Sequence[int],
    *,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    baseline_pairs: int = BASELINE_PAIRS,
    verdict_after: int = VERDICT_AFTER,
) -> CascadingRandomisation:
    """Adebayo's cascading randomisation of ``model`` for ``explainer`` on ``batch``, with Arun's verdict."""
    order = list(layers) if layers is not None else randomisation_order(model)
    if isinstance(verdict_after, bool) or not isinstance(verdict_after, int) or not 1 <= verdict_after <= len(order):
        raise TrustMetricError(f"verdict_after must be a step in 1..{len(order)}, got {verdict_after!r}")
    class_indices(targets, batch.shape[0])
    trained = explainer.explain(model, batch, targets)
    baseline = ssim_baseline(trained, pairs=baseline_pairs, seed=seed)
    steps = []
    for name, randomised in randomised_models(model, order, seed=seed):
        maps = explainer.explain(randomised, batch, targets)
        steps.append(RandomisationStep(name, ssim(trained, maps), spearman(trained, maps)))
    return CascadingRandomisation(tuple(steps), baseline, verdict_after)


def ssim_baseline(maps: Array, *, pairs: int = BASELINE_PAIRS, seed: int = 0) -> float:
    """Mean SSIM of ``pairs`` random pairs of maps of different images (all pairs when there are fewer)."""
    values = map_batch(maps, "maps")
    if len(values) < 2:
        raise TrustMetricError(f"the SSIM baseline needs maps of at least 2 images, got {len(values)}")
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise TrustMetricError(f"pairs must be an integer >= 1, got {pairs!r}")
    candidates = np.array(list(itertools.combinations(range(len(values)), 2)))
    rng = np.random.default_rng(seed)
    chosen = candidates[np.sort(rng.choice(len(candidates), size=min(pairs, len(candidates)), replace=False))]
    return float(ssim(values[chosen[:, 0]], values[chosen[:, 1]]).mean())


@dataclass(frozen=True)
class RandomLogit:
    """The map of a random other class against the target's map (``[B]`` each)."""

    other_targets: np.ndarray
    ssim: np.ndarray
    spearman: np.ndarray


def random_logit(
    model: nn.Module,
    explainer: MapExplainer,
    batch: torch.Tensor,
    targets: Sequence[int],
    *,
    num_classes: int | None = None,
    seed: int = 0,
) -> RandomLogit:
    """Maps for a random other class (uniform over the ``K - 1`` others, from ``seed``) against the target's."""
    target_array = class_indices(targets, batch.shape[0])
    classes = num_classes if num_classes is not None else int(forward_function(model)(batch[:1]).shape[1])
    if classes < 2:
        raise TrustMetricError(f"the random-logit check needs a model of at least 2 classes, got {classes}")
    if (target_array >= classes).any():
        raise TrustMetricError(f"targets {target_array.tolist()} out of range for {classes} classes")
    offsets = np.random.default_rng(seed).integers(1, classes, size=len(target_array))
    others = (target_array + offsets) % classes
    target_maps = explainer.explain(model, batch, target_array.tolist())
    other_maps = explainer.explain(model, batch, others.tolist())
    return RandomLogit(others, ssim(target_maps, other_maps), spearman(target_maps, other_maps))
