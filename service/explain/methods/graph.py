"""The model's computation graph, traced with ``torch.fx`` and executed one operation at a time.

DeepLIFT and LRP (:mod:`service.explain.methods.propagation`) walk a model's graph backwards with
a rule per kind of operation, so they need every operation the forward pass applies to the input,
in order, with every intermediate value (activation) kept, and the operation of each node in a
form they can re-run (a vector-Jacobian product, a convolution with other weights). Hooks on
modules cannot give that: they miss functional calls (``F.relu``, ``x + y``, ``torch.cat``) and
reused modules. :class:`TracedGraph` traces the model with ``torch.fx.symbolic_trace`` (nothing is
attached to or changed in the model; leaf modules in the graph are the model's own objects),
classifies each node that touches an activation into a kind (:data:`WEIGHTED`, :data:`BATCHNORM`,
:data:`RELU`, :data:`ELEMENTWISE`, :data:`MAXPOOL`, :data:`ROUTE`, :data:`AFFINE`), and runs it
out of place.

- Supported: any model that ``torch.fx`` can trace (no control flow on tensor values) whose
  operations on activations are all in the tables below: convolutions (1d/2d/3d, module or
  functional) and linear layers (module or ``F.linear``, also with weights computed from
  parameters, as the demo model's zero-sum head does), batch norm in eval mode with running
  statistics, ReLU (module, in-place or not, reused or not, ``torch.relu``/``F.relu``/
  ``Tensor.relu``), max and average pooling (plain and adaptive), additions and subtractions of
  activations (residual connections), concatenation, flatten/view/reshape/permute/indexing,
  dropout and identity (eval mode: identity), padding and interpolation, scaling by constants,
  means and sums, and the element-wise nonlinearities sigmoid, tanh, leaky ReLU, ELU, softplus,
  GELU and SiLU (DeepLIFT takes them, LRP does not). Sequential CNNs, ResNet-style residual
  blocks and DenseNet-style concatenating blocks all fit.
- Anything else applied to an activation (a product of two activations, softmax, attention, an
  unknown module, a TorchScript module) is an :class:`ExplainerError` naming the operation and
  the layer type. Operations on parameters alone (e.g. computing a weight) are free.
- After the graph has run, its logits can be compared with ``model(x)``
  (:meth:`TracedGraph.check_output`); a mismatch (e.g. a forward pass relying on an in-place
  update through an alias, which the graph executes out of place) is an error rather than a
  wrong map.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from service.explain.base import ExplainerError, check_logits

# --- operation kinds ------------------------------------------------------------------------------

WEIGHTED = "weighted"  # convolution / linear layer: LRP rules apply here
BATCHNORM = "batchnorm"  # eval-mode batch norm: folded into the layer before it, or affine
RELU = "relu"
ELEMENTWISE = "elementwise"  # other element-wise nonlinearities (DeepLIFT only)
MAXPOOL = "maxpool"
ROUTE = "route"  # linear, bias-free rearrangements and selections: flatten, cat, indexing, identity
AFFINE = "affine"  # other affine maps of activations: add, sub, avg-pool, mean, scaling, padding

#: Kinds whose operation is linear in the activations: DeepLIFT passes multipliers through as gradients.
LINEAR_KINDS = {WEIGHTED, BATCHNORM, ROUTE, AFFINE}

#: The out-of-place function that computes one graph operation from the node's argument values.
OperationFn = Callable[..., Any]


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def _relu(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.relu(x)  # out of place, whatever ``inplace`` said


def _without_inplace(function: Callable[..., torch.Tensor]) -> OperationFn:
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.pop("inplace", None)
        return function(*args, **kwargs)

    return run


#: ``isinstance`` table for leaf modules: (types, kind, runner(module, x)); first match wins.
_MODULES: list[tuple[tuple[type[nn.Module], ...], str, Callable[[nn.Module, torch.Tensor], torch.Tensor]]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear), WEIGHTED, lambda m, x: m(x)),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), BATCHNORM, lambda m, x: m(x)),
    ((nn.ReLU,), RELU, lambda m, x: torch.relu(x)),
    ((nn.LeakyReLU,), ELEMENTWISE, lambda m, x: F.leaky_relu(x, m.negative_slope)),
    ((nn.ELU,), ELEMENTWISE, lambda m, x: F.elu(x, m.alpha)),
    ((nn.SiLU,), ELEMENTWISE, lambda m, x: F.silu(x)),
    ((nn.Sigmoid, nn.Tanh, nn.Softplus, nn.GELU), ELEMENTWISE, lambda m, x: m(x)),
    (
        (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
        MAXPOOL,
        lambda m, x: m(x),
    ),
    ((nn.Flatten, nn.Unflatten, nn.Identity), ROUTE, lambda m, x: m(x)),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), ROUTE, lambda m, x: x),
    (
        (
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
            nn.Upsample,
            nn.ZeroPad2d,
            nn.ConstantPad1d,
            nn.ConstantPad2d,
            nn.ConstantPad3d,
            nn.ReflectionPad2d,
            nn.ReplicationPad2d,
        ),
        AFFINE,
        lambda m, x: m(x),
    ),
]

#: Functions: target -> (kind, out-of-place runner).
_FUNCTIONS: dict[Any, tuple[str, OperationFn]] = {
    torch.conv1d: (WEIGHTED, torch.conv1d),
    torch.conv2d: (WEIGHTED, torch.conv2d),
    torch.conv3d: (WEIGHTED, torch.conv3d),
    F.linear: (WEIGHTED, F.linear),
    F.relu: (RELU, _relu),
    torch.relu: (RELU, _relu),
    torch.relu_: (RELU, _relu),
    torch.sigmoid: (ELEMENTWISE, torch.sigmoid),
    F.sigmoid: (ELEMENTWISE, torch.sigmoid),
    torch.tanh: (ELEMENTWISE, torch.tanh),
    F.tanh: (ELEMENTWISE, torch.tanh),
    F.leaky_relu: (ELEMENTWISE, _without_inplace(F.leaky_relu)),
    F.elu: (ELEMENTWISE, _without_inplace(F.elu)),
    F.silu: (ELEMENTWISE, _without_inplace(F.silu)),
    F.softplus: (ELEMENTWISE, F.softplus),
    F.gelu: (ELEMENTWISE, F.gelu),
    F.max_pool1d: (MAXPOOL, F.max_pool1d),
    F.max_pool2d: (MAXPOOL, F.max_pool2d),
    F.max_pool3d: (MAXPOOL, F.max_pool3d),
    F.adaptive_max_pool1d: (MAXPOOL, F.adaptive_max_pool1d),
    F.adaptive_max_pool2d: (MAXPOOL, F.adaptive_max_pool2d),
    F.dropout: (ROUTE, _identity),
    F.dropout1d: (ROUTE, _identity),
    F.dropout2d: (ROUTE, _identity),
    F.dropout3d: (ROUTE, _identity),
    F.alpha_dropout: (ROUTE, _identity),
    torch.flatten: (ROUTE, torch.flatten),
    torch.reshape: (ROUTE, torch.reshape),
    torch.cat: (ROUTE, torch.cat),
    torch.concat: (ROUTE, torch.concat),
    torch.permute: (ROUTE, torch.permute),
    torch.transpose: (ROUTE, torch.transpose),
    torch.squeeze: (ROUTE, torch.squeeze),
    torch.unsqueeze: (ROUTE, torch.unsqueeze),
    torch.clone: (ROUTE, torch.clone),
    operator.getitem: (ROUTE, operator.getitem),
    operator.add: (AFFINE, operator.add),
    operator.iadd: (AFFINE, operator.add),
    torch.add: (AFFINE, torch.add),
    operator.sub: (AFFINE, operator.sub),
    operator.isub: (AFFINE, operator.sub),
    torch.sub: (AFFINE, torch.sub),
    operator.neg: (AFFINE, operator.neg),
    torch.neg: (AFFINE, torch.neg),
    operator.mul: (AFFINE, operator.mul),
    operator.imul: (AFFINE, operator.mul),
    torch.mul: (AFFINE, torch.mul),
    operator.truediv: (AFFINE, operator.truediv),
    operator.itruediv: (AFFINE, operator.truediv),
    torch.div: (AFFINE, torch.div),
    torch.mean: (AFFINE, torch.mean),
    torch.sum: (AFFINE, torch.sum),
    F.avg_pool1d: (AFFINE, F.avg_pool1d),
    F.avg_pool2d: (AFFINE, F.avg_pool2d),
    F.avg_pool3d: (AFFINE, F.avg_pool3d),
    F.adaptive_avg_pool1d: (AFFINE, F.adaptive_avg_pool1d),
    F.adaptive_avg_pool2d: (AFFINE, F.adaptive_avg_pool2d),
    F.adaptive_avg_pool3d: (AFFINE, F.adaptive_avg_pool3d),
    F.pad: (AFFINE, F.pad),
    F.interpolate: (AFFINE, F.interpolate),
}

#: Tensor methods: name -> (kind, out-of-place name).
_METHODS: dict[str, tuple[str, str]] = {
    **{name: (ROUTE, name) for name in ("view", "reshape", "flatten", "permute", "transpose", "squeeze")},
    **{name: (ROUTE, name) for name in ("unsqueeze", "contiguous", "clone", "expand", "expand_as", "view_as")},
    "reshape_as": (ROUTE, "reshape_as"),
    "relu": (RELU, "relu"),
    "relu_": (RELU, "relu"),
    "sigmoid": (ELEMENTWISE, "sigmoid"),
    "sigmoid_": (ELEMENTWISE, "sigmoid"),
    "tanh": (ELEMENTWISE, "tanh"),
    "tanh_": (ELEMENTWISE, "tanh"),
    **{name: (AFFINE, name.rstrip("_")) for name in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")},
    **{name: (AFFINE, name) for name in ("neg", "mean", "sum")},
}

#: Products: affine only when exactly one factor (for division: the numerator) is an activation.
_PRODUCT_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_PRODUCT_METHODS = {"mul", "mul_", "div", "div_"}

#: Operations on activations that give metadata, not tensors.
_METADATA_METHODS = {"size", "dim", "ndimension", "numel"}
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda"}

#: Arguments that must be False: name, position, default.
_MUST_BE_FALSE: dict[Any, tuple[str, int, bool]] = {
    F.max_pool1d: ("return_indices", 6, False),
    F.max_pool2d: ("return_indices", 6, False),
    F.max_pool3d: ("return_indices", 6, False),
    F.adaptive_max_pool1d: ("return_indices", 2, False),
    F.adaptive_max_pool2d: ("return_indices", 2, False),
    F.dropout: ("training", 2, True),
    F.dropout1d: ("training", 2, True),
    F.dropout2d: ("training", 2, True),
    F.dropout3d: ("training", 2, True),
    F.alpha_dropout: ("training", 2, False),
}


@dataclass(frozen=True)
class GraphOp:
    """How one active node is run: its kind, a label for messages, the function and its module."""

    kind: str
    label: str  # for messages: "layer 'features.0' (Conv2d)", "function add", "method view"
    run: OperationFn  # out-of-place; called with the node's args and kwargs (values)
    module: nn.Module | None = None


@dataclass(frozen=True)
class WeightedLayer:
    """A convolution or linear layer as ``apply(x, weight, bias)``; ``weight``/``bias`` may be folded."""

    kind: str  # "conv" or "linear"
    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    label: str


def _describe(node: fx.Node, module: nn.Module | None = None) -> str:
    if node.op == "call_module":
        return f"layer {node.target!r} ({type(module).__name__})"
    if node.op == "call_method":
        return f"method Tensor.{node.target} (node {node.name!r})"
    target = getattr(node.target, "__name__", repr(node.target))
    return f"function {target} (node {node.name!r})"


class TracedGraph:
    """A model's ``torch.fx`` graph, executed node by node with every activation kept.

    ``run`` executes the graph on an input (no gradients) and returns the value of every node;
    ``active`` holds the nodes whose value is a tensor computed from the input. Operations on
    active values must be in the tables above (an :class:`ExplainerError` otherwise) and run out
    of place, so every recorded activation is the value the operation produced.
    """

    def __init__(self, module: nn.Module, method: str) -> None:
        self.method = method
        self.model_name = type(module).__name__
        try:
            self.graph_module = fx.symbolic_trace(module)
        except fx.proxy.TraceError as exc:
            raise ExplainerError(
                f"{method} needs a model torch.fx can trace (no Python control flow on tensor values); "
                f"tracing {type(module).__name__} failed: {exc}"
            ) from exc
        self.nodes = list(self.graph_module.graph.nodes)
        placeholders = [node for node in self.nodes if node.op == "placeholder"]
        if not placeholders:
            raise ExplainerError(f"{type(module).__name__}.forward takes no input")
        self.input = placeholders[0]
        (output,) = [node for node in self.nodes if node.op == "output"]
        if not isinstance(output.args[0], fx.Node):
            raise ExplainerError(f"{method} needs a model that returns one logits tensor [B, K]")
        self.result: fx.Node = output.args[0]
        self.ops: dict[fx.Node, GraphOp] = {}
        self.active: set[fx.Node] = set()

    # - execution -

    def run(self, inputs: torch.Tensor) -> dict[fx.Node, Any]:
        """Every node's value for ``inputs`` (no gradients)."""
        env: dict[fx.Node, Any] = {}
        self.active = active = set()
        with torch.no_grad():
            for node in self.nodes:
                if node.op == "output":
                    continue
                if node.op == "placeholder":
                    if node is self.input:
                        env[node] = inputs
                        active.add(node)
                    elif node.args:
                        env[node] = node.args[0]  # an optional argument left at its default
                    else:
                        raise ExplainerError(f"{self.method} can only call models with one input; forward needs more")
                    continue
                if node.op == "get_attr":
                    env[node] = self._attribute(str(node.target))
                    continue
                parents = [parent for parent in node.all_input_nodes if parent in active]
                if not parents:
                    env[node] = self._plain_call(node, env)
                    continue
                op = self.op(node)
                if op is None:  # metadata of an activation (its shape, ...)
                    value = self._plain_call(node, env)
                    if isinstance(value, torch.Tensor):
                        raise ExplainerError(f"{self.method} does not support {_describe(node)} on activations")
                    env[node] = value
                    continue
                value = self.call(node, env)
                if not isinstance(value, torch.Tensor):
                    raise ExplainerError(
                        f"{self.method} supports only operations returning one tensor; {op.label} returns "
                        f"{type(value).__name__}"
                    )
                env[node] = value
                active.add(node)
        if self.result not in active:
            raise ExplainerError(f"the output of {self.model_name} does not depend on its input")
        return env

    def _attribute(self, target: str) -> Any:
        value: Any = self.graph_module
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def _plain_call(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "call_module":
            return self.graph_module.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return node.target(*args, **kwargs)  # type: ignore[operator]

    def call(self, node: fx.Node, env: dict[fx.Node, Any], replace: dict[fx.Node, torch.Tensor] | None = None) -> Any:
        """Run an activation node's operation (out of place), inputs from ``env`` or ``replace``."""
        replace = replace or {}
        args = fx.node.map_arg(node.args, lambda n: replace[n] if n in replace else env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: replace[n] if n in replace else env[n])
        op = self.ops[node]
        if op.module is not None:
            return op.run(op.module, *args, **kwargs)
        return op.run(*args, **kwargs)

    def op(self, node: fx.Node) -> GraphOp | None:
        """The operation of an active node; ``None`` for metadata; an error when unsupported."""
        if node in self.ops:
            return self.ops[node]
        op = self._classify(node)
        if op is not None:
            self.ops[node] = op
        return op

    def _classify(self, node: fx.Node) -> GraphOp | None:
        if node.op == "call_module":
            module = self.graph_module.get_submodule(str(node.target))
            label = _describe(node, module)
            for types, kind, runner in _MODULES:
                if isinstance(module, types):
                    if getattr(module, "return_indices", False):
                        raise ExplainerError(f"{self.method} does not support {label} with return_indices=True")
                    if kind == BATCHNORM and getattr(module, "running_mean", None) is None:
                        raise ExplainerError(
                            f"{self.method} does not support {label} without running statistics: it normalises "
                            "over the batch, so samples are not independent"
                        )
                    return GraphOp(kind, label, runner, module)
            raise ExplainerError(self._unsupported(label))
        label = _describe(node)
        if node.op == "call_method":
            name = str(node.target)
            if name in _METADATA_METHODS:
                return None
            if name not in _METHODS:
                raise ExplainerError(self._unsupported(label))
            kind, plain = _METHODS[name]
            if name in _PRODUCT_METHODS:
                self._check_product(node, label, divide=name.startswith("div"))

            def run_method(*args: Any, **kwargs: Any) -> Any:
                return getattr(args[0], plain)(*args[1:], **kwargs)

            return GraphOp(kind, label, run_method)
        if node.target is getattr and len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES:
            return None
        entry = _FUNCTIONS.get(node.target)
        if entry is None:
            raise ExplainerError(self._unsupported(label))
        kind, runner = entry
        if node.target in _MUST_BE_FALSE:
            keyword, position, default = _MUST_BE_FALSE[node.target]
            value = node.kwargs.get(keyword, node.args[position] if len(node.args) > position else default)
            if value is not False:
                raise ExplainerError(f"{self.method} does not support {label} with {keyword}={value!r}")
        if node.target in _PRODUCT_FUNCTIONS:
            self._check_product(node, label, divide=node.target in (operator.truediv, operator.itruediv, torch.div))
        return GraphOp(kind, label, runner)

    def _check_product(self, node: fx.Node, label: str, divide: bool) -> None:
        operands = list(node.args[:2])
        activations = [isinstance(a, fx.Node) and a in self.active for a in operands]
        if sum(activations) != 1 or (divide and not activations[0]):
            raise ExplainerError(
                f"{self.method} supports {label} only as scaling of one activation by a constant; here it "
                "combines activations non-linearly"
            )

    def _unsupported(self, label: str) -> str:
        return (
            f"{self.method} does not support {label} applied to activations; supported are convolutions, "
            "linear layers, batch norm, ReLU, pooling, additions, concatenation and reshaping (see "
            "service.explain.methods.graph)"
        )

    # - backward helpers -

    def parents(self, node: fx.Node) -> list[fx.Node]:
        """The node's active inputs (each once, in argument order)."""
        return [parent for parent in node.all_input_nodes if parent in self.active]

    def vjp(
        self, node: fx.Node, env: dict[fx.Node, Any], parents: Sequence[fx.Node], grad_output: torch.Tensor
    ) -> list[torch.Tensor]:
        """``J^T grad_output`` for each of ``parents``, the Jacobian taken at ``env``."""
        with torch.enable_grad():
            leaves = {parent: env[parent].detach().requires_grad_(True) for parent in parents}
            output = self.call(node, env, leaves)
            grads = torch.autograd.grad(output, list(leaves.values()), grad_output, allow_unused=True)
        return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves.values(), grads)]

    def layer(self, node: fx.Node, env: dict[fx.Node, Any]) -> WeightedLayer:
        """The convolution or linear layer of a WEIGHTED node."""
        op = self.ops[node]
        if op.module is not None:
            module = op.module
            (source,) = self.parents(node)
            if isinstance(module, nn.Linear):
                return WeightedLayer("linear", source, module.weight, module.bias, F.linear, op.label)
            conv = module

            def apply_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
                return conv._conv_forward(x, weight, bias)  # type: ignore[operator]

            return WeightedLayer("conv", source, module.weight, module.bias, apply_conv, op.label)
        names = ["input", "weight", "bias"] + (
            ["stride", "padding", "dilation", "groups"] if node.target is not F.linear else []
        )
        bound: dict[str, Any] = dict(zip(names, node.args))
        bound.update(node.kwargs)
        source, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
        if (
            not isinstance(source, fx.Node)
            or source not in self.active
            or any(isinstance(value, fx.Node) and value in self.active for value in (weight, bias))
        ):
            raise ExplainerError(f"{self.method} supports {op.label} only with weights that do not depend on the input")
        others = {key: fx.node.map_arg(value, lambda n: env[n]) for key, value in bound.items() if key not in names[:3]}
        function = node.target

        def apply_function(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            return function(x, w, b, **others)  # type: ignore[operator]

        return WeightedLayer(
            "linear" if node.target is F.linear else "conv",
            source,
            env[weight] if isinstance(weight, fx.Node) else weight,
            env[bias] if isinstance(bias, fx.Node) else bias,
            apply_function,
            op.label,
        )

    def check_output(
        self, module: nn.Module, inputs: torch.Tensor, env: dict[fx.Node, Any], targets: torch.Tensor
    ) -> None:
        """The graph's logits must be the model's (see the module docstring)."""
        logits = env[self.result]
        check_logits(logits, targets)
        with torch.no_grad():
            expected = module(inputs)
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if expected.shape != logits.shape or not torch.allclose(logits, expected, rtol=1e-4, atol=1e-5 * scale + 1e-6):
            raise ExplainerError(
                f"{self.method}: the torch.fx graph of {type(module).__name__} does not reproduce its output "
                "(does forward rely on an in-place update through an alias, or on hooks?); cannot propagate"
            )
