"""Propagation family: DeepLIFT (rescale rule) and layer-wise relevance propagation (LRP).

Both walk the model's computation graph backwards, one operation at a time, with a rule per kind
of operation. The graph, the models it supports and the errors for those it does not are
:mod:`service.explain.methods.graph`'s (:class:`~service.explain.methods.graph.TracedGraph`);
here are the rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from service.explain.base import ExplainerError
from service.explain.methods.gradient import InputAttribution, target_logits
from service.explain.methods.graph import (
    BATCHNORM,
    ELEMENTWISE,
    LINEAR_KINDS,
    MAXPOOL,
    RELU,
    ROUTE,
    WEIGHTED,
    TracedGraph,
    WeightedLayer,
)
from service.explain.settings import choice, finite_float

#: Rescale-rule threshold on |x - x0| below which the ordinary gradient is used (Captum's default).
RESCALE_EPS = 1e-10


def _accumulate(store: dict[fx.Node, torch.Tensor], nodes: Iterable[fx.Node], values: Iterable[torch.Tensor]) -> None:
    for node, value in zip(nodes, values):
        store[node] = store[node] + value if node in store else value


def _one_hot(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.one_hot(targets, logits.shape[1]).to(logits.dtype)


class _PropagationExplainer(InputAttribution):
    def _check_module(self, module: nn.Module) -> None:
        # The same check TracedGraph makes, before any work.
        for name, sub in module.named_modules():
            if isinstance(sub, torch.jit.ScriptModule):
                where = f"submodule {name!r} is" if name else "the model is"
                raise ExplainerError(
                    f"{self.name} follows the model's graph with torch.fx, but {where} TorchScript, which it "
                    "cannot trace; use the eager torch model (torch weights in the model card)"
                )


# --- DeepLIFT -------------------------------------------------------------------------------------


class DeepLift(_PropagationExplainer):
    """DeepLIFT with the rescale rule (Shrikumar et al., 2017), Captum's semantics.

    Reference input: the constant ``baseline`` (normalised input units). The graph runs on the
    input and on the reference; multipliers go backwards from the target logit: through linear
    operations as gradients, through each element-wise nonlinearity as ``dy/dx = (y - y0) /
    (x - x0)`` (the gradient where ``|x - x0| < 1e-10``), through max pooling as in Captum
    (the part of the output difference above the reference's output goes to the input's
    arg-max, the rest to the reference's arg-max, each divided by that input difference).
    ``attr = (x - x0) * multiplier``, summed over channels; summation-to-delta holds:
    the attributions add up to ``f(x) - f(x0)`` (see :meth:`explain_with_delta`).
    """

    name: ClassVar[str] = "deeplift"

    def __init__(self, baseline: float = 0.0) -> None:
        self.baseline = finite_float("baseline", baseline)

    def _attribute(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        graph = TracedGraph(module, self.name)
        reference = torch.full_like(inputs, self.baseline)
        env_ref = graph.run(reference)
        env = graph.run(inputs)
        graph.check_output(module, inputs, env, targets)
        multipliers: dict[fx.Node, torch.Tensor] = {graph.result: _one_hot(env[graph.result], targets)}
        for node in reversed(graph.nodes):
            if node is graph.input:
                break
            multiplier = multipliers.pop(node, None)
            if multiplier is None or node not in graph.active:
                continue
            op = graph.ops[node]
            parents = graph.parents(node)
            if op.kind in LINEAR_KINDS:
                _accumulate(multipliers, parents, graph.vjp(node, env, parents, multiplier))
                continue
            (parent,) = parents
            delta_in = env[parent] - env_ref[parent]
            (gradient,) = graph.vjp(node, env, parents, multiplier)
            if op.kind == MAXPOOL:
                top = torch.maximum(env[node], env_ref[node])
                (own,) = graph.vjp(node, env, parents, multiplier * (top - env_ref[node]))
                (other,) = graph.vjp(node, env_ref, parents, multiplier * (env[node] - top))
                rescaled = (own + other) / delta_in
            else:
                rescaled = multiplier * (env[node] - env_ref[node]) / delta_in
            _accumulate(multipliers, parents, [torch.where(delta_in.abs() < RESCALE_EPS, gradient, rescaled)])
        multiplier = multipliers.get(graph.input, torch.zeros_like(inputs))
        return (inputs - reference) * multiplier

    def _reference(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        both = torch.cat([inputs, torch.full_like(inputs, self.baseline)])
        scores = target_logits(module, both, targets.repeat(2), max(1, inputs.shape[0]))
        return scores[: inputs.shape[0]] - scores[inputs.shape[0] :]


# --- LRP ------------------------------------------------------------------------------------------

LRP_COMPOSITES = ("epsilon", "gamma", "alpha_beta", "zplus", "epsilon_gamma_box", "epsilon_plus", "epsilon_alpha_beta")


def _stabilise(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) = 1``: never zero."""
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


class LRP(_PropagationExplainer):
    """Layer-wise relevance propagation (Bach et al., 2015; Montavon et al., 2019).

    The target logit is the relevance at the output; it flows back through the graph
    (:class:`TracedGraph`) and the map is the relevance reaching the input, summed over channels.
    Convolution and linear layers use the rule the ``composite`` assigns them:

    - ``epsilon``: ``R_i = sum_j x_i w_ij / (z_j + epsilon sign z_j) R_j`` (bias included in ``z``);
    - ``gamma``: the epsilon formula with ``w + gamma w+`` and ``b + gamma b+`` (meant for layers
      whose inputs are ReLU outputs, i.e. not negative);
    - ``alpha_beta``: ``alpha`` times the share of the positive contributions ``(x_i w_ij)+``
      minus ``beta`` times that of the negative ones, bias ignored; with ``alpha - beta = 1`` the
      relevance is conserved except at neurons that have no negative (or no positive) inputs;
    - ``zplus``: ``alpha_beta`` with ``alpha = 1, beta = 0``;
    - z^B (``box``): for the layer that reads the pixels, ``x w - low w+ - high w-`` shares with
      the pixel bounds ``low``/``high`` (per-sample minimum and maximum when left ``None``).

    Composites: ``epsilon``, ``gamma``, ``alpha_beta``, ``zplus`` (one rule for every layer);
    ``epsilon_gamma_box`` (z^B on the input layer, gamma on the other convolutions, epsilon on
    linear layers); ``epsilon_plus`` (z+ on convolutions, epsilon on linear layers);
    ``epsilon_alpha_beta`` (alpha-beta on convolutions, epsilon on linear layers).

    Everything else: ReLU passes relevance unchanged; max pooling, concatenation, reshaping and
    indexing route it (``J^T R``: winner takes all, each part keeps its own); other affine maps
    of activations share it in proportion to each input's contribution (the epsilon rule with
    the operation's Jacobian): a residual addition ``a + b`` gives ``a / (a + b)`` of the
    relevance to ``a`` and ``b / (a + b)`` to ``b``, average pooling shares it by the pixel values.
    A batch norm directly after a convolution or linear layer (whose output feeds nothing else)
    is folded into it (fresh folded weights; the model is not modified); any other batch norm is
    an affine map. Without biases and with ``epsilon -> 0`` the relevance is conserved: the map
    adds up to the target logit (see :meth:`explain_with_delta`).
    """

    name: ClassVar[str] = "lrp"

    def __init__(
        self,
        composite: str = "epsilon",
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        alpha: float = 2.0,
        beta: float = 1.0,
        low: float | None = None,
        high: float | None = None,
    ) -> None:
        self.composite = choice("composite", composite, LRP_COMPOSITES)
        self.epsilon = finite_float("epsilon", epsilon, minimum=0.0, strict=True)
        self.gamma = finite_float("gamma", gamma, minimum=0.0)
        self.alpha = finite_float("alpha", alpha, minimum=1.0)
        self.beta = finite_float("beta", beta, minimum=0.0)
        if abs(self.alpha - self.beta - 1.0) > 1e-9:
            raise ExplainerError(
                f"alpha - beta must be 1 so that relevance is conserved, got alpha={alpha!r}, beta={beta!r}"
            )
        self.low = None if low is None else finite_float("low", low)
        self.high = None if high is None else finite_float("high", high)
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ExplainerError(f"low must be below high, got low={low!r}, high={high!r}")

    def rule_for(self, layer: WeightedLayer, reads_input: bool) -> str:
        """The rule the composite assigns to ``layer``."""
        if self.composite in ("epsilon", "gamma", "alpha_beta", "zplus"):
            return self.composite
        if layer.kind == "linear":
            return "epsilon"
        if self.composite == "epsilon_gamma_box":
            return "box" if reads_input else "gamma"
        return "zplus" if self.composite == "epsilon_plus" else "alpha_beta"

    def _attribute(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        graph = TracedGraph(module, self.name)
        env = graph.run(inputs)
        for node in graph.active:
            op = graph.ops.get(node)
            if op is not None and op.kind == ELEMENTWISE:
                raise ExplainerError(
                    f"{self.name} has no rule for {op.label}; supported nonlinearities: ReLU and max pooling"
                )
        graph.check_output(module, inputs, env, targets)
        folds = self._batchnorm_folds(graph)
        reads_input = self._reads_input(graph)
        logits = env[graph.result]
        relevance: dict[fx.Node, torch.Tensor] = {graph.result: _one_hot(logits, targets) * logits.detach()}
        for node in reversed(graph.nodes):
            if node is graph.input:
                break
            r = relevance.pop(node, None)
            if r is None or node not in graph.active:
                continue
            op = graph.ops[node]
            parents = graph.parents(node)
            if op.kind == RELU:
                _accumulate(relevance, parents, [r])
            elif op.kind in (ROUTE, MAXPOOL):
                _accumulate(relevance, parents, graph.vjp(node, env, parents, r))
            elif op.kind == WEIGHTED or node in folds:
                layer = graph.layer(folds.get(node, node), env)
                if node in folds:
                    layer = self._fold(layer, op.module)
                rule = self.rule_for(layer, layer.input in reads_input)
                _accumulate(relevance, [layer.input], [self._layer_rule(rule, layer, env[layer.input], r, inputs)])
            else:  # AFFINE, or a batch norm that cannot be folded
                z = env[node]
                shares = graph.vjp(node, env, parents, r / _stabilise(z, self.epsilon))
                _accumulate(relevance, parents, [env[p] * share for p, share in zip(parents, shares)])
        return relevance.get(graph.input, torch.zeros_like(inputs))

    def _reference(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return target_logits(module, inputs, targets, max(1, inputs.shape[0]))

    @staticmethod
    def _batchnorm_folds(graph: TracedGraph) -> dict[fx.Node, fx.Node]:
        """Batch-norm node -> the weighted node it folds into (whose output only it reads)."""
        folds = {}
        for node in graph.active:
            op = graph.ops.get(node)
            if op is None or op.kind != BATCHNORM:
                continue
            (parent,) = graph.parents(node)
            parent_op = graph.ops.get(parent)
            if parent_op is not None and parent_op.kind == WEIGHTED and len(parent.users) == 1:
                folds[node] = parent
        return folds

    @staticmethod
    def _reads_input(graph: TracedGraph) -> set[fx.Node]:
        """The input node and the nodes that only rearrange it (flatten, indexing, ...)."""
        near = {graph.input}
        for node in graph.nodes:
            op = graph.ops.get(node)
            if node in graph.active and op is not None and op.kind == ROUTE and set(graph.parents(node)) <= near:
                near.add(node)
        return near

    @staticmethod
    def _fold(layer: WeightedLayer, batchnorm: nn.Module | None) -> WeightedLayer:
        """``layer`` followed by the eval-mode ``batchnorm`` as one layer (new tensors)."""
        assert isinstance(batchnorm, nn.modules.batchnorm._BatchNorm)
        assert batchnorm.running_mean is not None and batchnorm.running_var is not None
        scale = torch.rsqrt(batchnorm.running_var + batchnorm.eps)
        if batchnorm.weight is not None:
            scale = scale * batchnorm.weight
        bias = layer.bias if layer.bias is not None else torch.zeros_like(batchnorm.running_mean)
        bias = (bias - batchnorm.running_mean) * scale
        if batchnorm.bias is not None:
            bias = bias + batchnorm.bias
        weight = layer.weight * scale.view((-1,) + (1,) * (layer.weight.ndim - 1))
        return WeightedLayer(layer.kind, layer.input, weight.detach(), bias.detach(), layer.apply, layer.label)

    def _layer_rule(
        self, rule: str, layer: WeightedLayer, x: torch.Tensor, relevance: torch.Tensor, inputs: torch.Tensor
    ) -> torch.Tensor:
        weight = layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach()
        apply = layer.apply
        with torch.enable_grad():
            if rule in ("epsilon", "gamma"):
                if rule == "gamma":
                    weight = weight + self.gamma * weight.clamp(min=0)
                    bias = None if bias is None else bias + self.gamma * bias.clamp(min=0)
                leaf = x.detach().requires_grad_(True)
                z = apply(leaf, weight, bias)
                (share,) = torch.autograd.grad(z, leaf, relevance / _stabilise(z.detach(), self.epsilon))
                return x * share
            positive, negative = weight.clamp(min=0), weight.clamp(max=0)
            if rule == "box":
                shape = (-1,) + (1,) * (x.ndim - 1)
                flat = inputs.detach().flatten(1)
                low = flat.min(dim=1).values if self.low is None else torch.full_like(flat[:, 0], self.low)
                high = flat.max(dim=1).values if self.high is None else torch.full_like(flat[:, 0], self.high)
                leaves = [
                    x.detach().requires_grad_(True),
                    low.view(shape).expand_as(x).clone().requires_grad_(True),
                    high.view(shape).expand_as(x).clone().requires_grad_(True),
                ]
                z = apply(leaves[0], weight, None) - apply(leaves[1], positive, None) - apply(leaves[2], negative, None)
                shares = torch.autograd.grad(z, leaves, relevance / _stabilise(z.detach(), self.epsilon))
                return sum(leaf.detach() * share for leaf, share in zip(leaves, shares))  # type: ignore[return-value]
            alpha, beta = (1.0, 0.0) if rule == "zplus" else (self.alpha, self.beta)
            x_pos = x.detach().clamp(min=0).requires_grad_(True)
            x_neg = x.detach().clamp(max=0).requires_grad_(True)
            result = torch.zeros_like(x)
            for factor, (w_pos, w_neg) in ((alpha, (positive, negative)), (-beta, (negative, positive))):
                if factor == 0:
                    continue
                # Positive contributions: x+ w+ and x- w-; negative ones: x+ w- and x- w+.
                z = apply(x_pos, w_pos, None) + apply(x_neg, w_neg, None)
                share_pos, share_neg = torch.autograd.grad(
                    z, [x_pos, x_neg], relevance / _stabilise(z.detach(), self.epsilon), allow_unused=True
                )
                for part, share in ((x_pos, share_pos), (x_neg, share_neg)):
                    if share is not None:
                        result = result + factor * part.detach() * share
            return result
