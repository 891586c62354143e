"""The traced graph (service/explain/methods/graph.py): every activation kept, each operation
classified and re-run out of place, unsupported operations named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.explain.base import ExplainerError
from service.explain.methods.graph import AFFINE, LINEAR_KINDS, RELU, ROUTE, WEIGHTED, TracedGraph
from tests.unit.service.explain.explainer_models import DenseNetLike, ResidualNet, build, images


@pytest.mark.parametrize("model", [build(DenseNetLike, inplace=True), build(ResidualNet, "reused")])
def test_run_reproduces_the_model_and_keeps_every_activation(model: nn.Module) -> None:
    x = images(2)
    graph = TracedGraph(model, "test")
    env = graph.run(x)
    torch.testing.assert_close(env[graph.result], model(x))
    graph.check_output(model, x, env, torch.tensor([0, 1]))
    assert graph.input in graph.active and graph.result in graph.active
    kinds = {graph.ops[node].kind for node in graph.active if node in graph.ops}
    assert {WEIGHTED, RELU} <= kinds
    for node in graph.active - {graph.input}:
        if node in graph.ops:  # each operation re-runs out of place to the recorded value
            torch.testing.assert_close(graph.call(node, env), env[node])


def test_a_reused_relu_module_is_one_operation_per_call() -> None:
    model = build(ResidualNet, "reused")
    graph = TracedGraph(model, "test")
    graph.run(images(1))
    relus = [node for node in graph.active if node in graph.ops and graph.ops[node].kind == RELU]
    assert len(relus) == 3


def test_the_kinds_that_pass_multipliers_through_as_gradients() -> None:
    assert LINEAR_KINDS >= {WEIGHTED, ROUTE, AFFINE} and RELU not in LINEAR_KINDS


class Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.conv(x).mean(dim=(2, 3)), dim=1)


def test_an_unsupported_operation_is_named() -> None:
    graph = TracedGraph(Softmaxed(), "lrp")
    with pytest.raises(
        ExplainerError, match=r"lrp does not support function softmax .*\(see service\.explain\.methods\.graph\)"
    ):
        graph.run(torch.zeros(1, 1, 8, 8))
