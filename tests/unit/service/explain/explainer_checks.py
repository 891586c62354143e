"""Checks shared by the explainer test files: the model must come back exactly as it was given."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def hook_count(model: nn.Module) -> int:
    """Forward, forward-pre, backward and backward-pre hooks on every submodule."""
    return sum(
        len(module._forward_hooks)
        + len(module._forward_pre_hooks)
        + len(module._backward_hooks)
        + len(module._backward_pre_hooks)
        for module in model.modules()
    )


@contextmanager
def left_as_found(model: nn.Module, x: torch.Tensor, *, frozen: torch.Tensor, eval_part: nn.Module) -> Iterator[None]:
    """Put ``model`` in a mixed state (one parameter frozen, train mode except ``eval_part``), run
    the block, then assert that modes, ``requires_grad``, ``.grad``, hooks, state (batch-norm
    statistics included) and the eval outputs are all as before."""
    frozen.requires_grad_(False)
    requires_grad = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        logits = model.eval()(x)
    model.train()
    eval_part.eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    yield
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert hook_count(model) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # batch-norm statistics untouched
    with torch.no_grad():
        assert torch.equal(model.eval()(x), logits)
