"""Target scoring (service/explain/scores.py): each score option against torch's own functions on
random logits, chunked forward passes, and the target checks."""

from __future__ import annotations

import pytest
import torch

from service.explain.base import ExplainerError, TargetOutOfRange
from service.explain.scores import (
    LOG_PROBABILITY,
    LOGIT,
    PROBABILITY,
    SCORE_KINDS,
    SCORES,
    check_targets_on_first_image,
    forward_scores,
    target_scores,
)


def random_logits(rows: int = 6, classes: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (4 * torch.randn(rows, classes, generator=torch.Generator().manual_seed(0))).to(dtype)


TARGETS = torch.tensor([0, 4, 2, 2, 1, 3])


def test_the_options() -> None:
    assert SCORES == ("logit", "probability")
    assert SCORE_KINDS == (LOGIT, PROBABILITY, LOG_PROBABILITY)


@pytest.mark.parametrize(
    ("score", "reference"),
    [
        (LOGIT, lambda logits: logits),
        (PROBABILITY, lambda logits: torch.softmax(logits, dim=1)),
        (LOG_PROBABILITY, lambda logits: torch.log_softmax(logits, dim=1)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_score_is_torchs_own(score: str, reference: object, dtype: torch.dtype) -> None:
    logits = random_logits(dtype=dtype)
    expected = torch.stack([reference(logits)[row, target] for row, target in enumerate(TARGETS.tolist())])  # type: ignore[operator]
    scores = target_scores(logits, TARGETS, score)
    assert scores.dtype == dtype
    assert torch.equal(scores, expected)


def test_probabilities_of_half_precision_logits_are_computed_in_float32() -> None:
    logits = random_logits(dtype=torch.float16)
    for score, reference in ((PROBABILITY, torch.softmax), (LOG_PROBABILITY, torch.log_softmax)):
        scores = target_scores(logits, TARGETS, score)
        assert scores.dtype == torch.float32
        assert torch.equal(scores, reference(logits.float(), dim=1).gather(1, TARGETS[:, None])[:, 0])
    assert target_scores(logits, TARGETS).dtype == torch.float16


def test_scores_carry_the_gradient_of_the_logits() -> None:
    logits = random_logits().requires_grad_(True)
    (gradient,) = torch.autograd.grad(target_scores(logits, TARGETS, LOG_PROBABILITY).sum(), logits)
    # d log p_t / d z = onehot(t) - softmax(z), row by row
    torch.testing.assert_close(
        gradient, torch.nn.functional.one_hot(TARGETS, 5) - torch.softmax(logits.detach(), dim=1)
    )


def test_targets_out_of_range_name_every_target_and_the_class_count() -> None:
    with pytest.raises(TargetOutOfRange, match=r"targets \[0, 4, 2, 2, 1, 3\] out of range for a model with 4 classes"):
        target_scores(random_logits(classes=4), TARGETS)
    with pytest.raises(ExplainerError, match=r"logits \[B, K\] with B = 6, got shape \(6,\)"):
        target_scores(random_logits()[:, 0], TARGETS)


def test_unknown_score_is_named() -> None:
    with pytest.raises(
        ExplainerError, match="score must be one of 'logit', 'probability', 'log_probability', got 'prob'"
    ):
        target_scores(random_logits(), TARGETS, "prob")


def test_forward_scores_in_chunks_equal_one_pass() -> None:
    weight = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    calls: list[int] = []

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        calls.append(inputs.shape[0])
        return inputs @ weight.T

    inputs = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    whole = forward_scores(forward, inputs, TARGETS, PROBABILITY)
    chunked = forward_scores(forward, inputs, TARGETS, PROBABILITY, chunk_size=4)
    assert calls == [6, 4, 2]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-7)
    torch.testing.assert_close(whole, torch.softmax(forward(inputs), dim=1).gather(1, TARGETS[:, None])[:, 0])
    with pytest.raises(TargetOutOfRange, match=r"targets \[0, 7\] out of range for a model with 5 classes"):
        forward_scores(forward, inputs[:2], torch.tensor([0, 7]), LOGIT, chunk_size=1)


def test_targets_checked_on_the_first_image_only() -> None:
    calls: list[int] = []

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        calls.append(inputs.shape[0])
        return torch.zeros(inputs.shape[0], 3)

    check_targets_on_first_image(forward, torch.zeros(4, 2), torch.tensor([0, 1, 2, 1]))
    assert calls == [1]
    with pytest.raises(TargetOutOfRange, match=r"targets \[0, 3, 2, 1\] out of range for a model with 3 classes"):
        check_targets_on_first_image(forward, torch.zeros(4, 2), torch.tensor([0, 3, 2, 1]))
