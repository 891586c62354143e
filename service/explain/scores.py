"""Target scoring: how every explainer reads its target's score off the model's logits.

A saliency map explains one number per sample, the *score* of its target class, read off the
logits ``[B, K]`` in one of three ways:

- ``logit``: the target's logit itself (gradient, propagation, CAM and occlusion methods always);
- ``probability``: its softmax probability;
- ``log_probability``: its log-softmax (class model visualisation's ``log_softmax`` objective,
  the real-time masker's training loss).

Softmax and log-softmax run in at least float32 (half-precision logits are promoted first,
float32 and float64 logits keep their type). Methods with a ``score`` setting accept
:data:`SCORES`. The targets are checked against the logits (:func:`~service.explain.base.check_logits`)
before any score is read, so an out-of-range target is a clear error, never an index error.
"""

from __future__ import annotations

import torch

from service.explain.base import ForwardFn, check_logits
from service.explain.settings import choice

LOGIT = "logit"
PROBABILITY = "probability"
LOG_PROBABILITY = "log_probability"
#: The values of the ``score`` setting of the methods that have one (RISE, HiPe, LIME, KernelSHAP,
#: Score-CAM, meaningful and extremal perturbation).
SCORES = (LOGIT, PROBABILITY)
#: Every score :func:`target_scores` reads.
SCORE_KINDS = (LOGIT, PROBABILITY, LOG_PROBABILITY)


def target_scores(logits: torch.Tensor, targets: torch.Tensor, score: str = LOGIT) -> torch.Tensor:
    """Each row's score at its own target, ``[N]``, differentiable when ``logits`` are.

    ``logits`` is ``[N, K]`` and ``targets`` a long tensor ``[N]``; both are checked first.
    """
    check_logits(logits, targets)
    choice("score", score, SCORE_KINDS)
    if score == PROBABILITY:
        logits = torch.softmax(_at_least_float32(logits), dim=1)
    elif score == LOG_PROBABILITY:
        logits = torch.log_softmax(_at_least_float32(logits), dim=1)
    return logits.gather(1, targets[:, None])[:, 0]


def forward_scores(
    forward: ForwardFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    score: str = LOGIT,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`target_scores` of ``forward(inputs)``, the inputs sent ``chunk_size`` at a time
    (all at once when ``None``); the targets are checked once, against all the logits."""
    if chunk_size is None:
        logits = forward(inputs)
    else:
        logits = torch.cat([forward(part) for part in inputs.split(chunk_size)])
    return target_scores(logits, targets, score)


def check_targets_on_first_image(forward: ForwardFn, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """One forward pass of the first image: every target must be a class of the model.

    For methods whose forward passes mix images in chunks: checking up front reports the batch's
    own targets, not those of whichever chunk fails first.
    """
    logits = forward(inputs[:1])
    if logits.ndim == 2 and logits.shape[0] == 1:
        logits = logits.expand(len(targets), -1)
    check_logits(logits, targets if logits.shape[0] == len(targets) else targets[:1])


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
