"""Propagation family: DeepLIFT (rescale rule) and layer-wise relevance propagation (LRP).

Both walk the model's computation graph backwards, one operation at a time, with a rule per kind
of operation. The graph comes from ``torch.fx.symbolic_trace`` of the model (nothing is attached
to or changed in the model; leaf modules in the graph are the model's own objects):

- Supported: any model that ``torch.fx`` can trace (no control flow on tensor values) whose
  operations on activations are all in the tables below: convolutions (1d/2d/3d, module or
  functional) and linear layers (module or ``F.linear``, also with weights computed from
  parameters, as the demo model's zero-sum head does), batch norm in eval mode with running
  statistics, ReLU (module, in-place or not, reused or not, ``torch.relu``/``F.relu``/
  ``Tensor.relu``), max and average pooling (plain and adaptive), additions and subtractions of
  activations (residual connections), concatenation, flatten/view/reshape/permute/indexing,
  dropout and identity (eval mode: identity), padding and interpolation, scaling by constants,
  means and sums. DeepLIFT also takes sigmoid, tanh, leaky ReLU, ELU, softplus, GELU and SiLU.
  Sequential CNNs, ResNet-style residual blocks and DenseNet-style concatenating blocks all fit.
- Anything else applied to an activation (a product of two activations, softmax, attention, an
  unknown module, a TorchScript module) is an :class:`ExplainerError` naming the operation and
  the layer type. Operations on parameters alone (e.g. computing a weight) are free.
- After the graph has run, its logits are compared with ``model(x)``; a mismatch (e.g. a forward
  pass relying on an in-place update through an alias, which the graph executes out of place)
  is an error rather than a wrong map.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from service.explain.base import ExplainerError, check_logits
from service.explain.methods.gradient import InputAttribution, target_logits
from service.explain.settings import choice, finite_float

# --- operation kinds ------------------------------------------------------------------------------

WEIGHTED = "weighted"  # convolution / linear layer: LRP rules apply here
BATCHNORM = "batchnorm"  # eval-mode batch norm: folded into the layer before it, or affine
RELU = "relu"
ELEMENTWISE = "elementwise"  # other element-wise nonlinearities (DeepLIFT only)
MAXPOOL = "maxpool"
ROUTE = "route"  # linear, bias-free rearrangements and selections: flatten, cat, indexing, identity
AFFINE = "affine"  # other affine maps of activations: add, sub, avg-pool, mean, scaling, padding

_LINEAR_KINDS = {WEIGHTED, BATCHNORM, ROUTE, AFFINE}

Runner = Callable[..., Any]


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def _relu(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.relu(x)  # out of place, whatever ``inplace`` said


def _without_inplace(function: Callable[..., torch.Tensor]) -> Runner:
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
_FUNCTIONS: dict[Any, tuple[str, Runner]] = {
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

#: Rescale-rule threshold on |x - x0| below which the ordinary gradient is used (Captum's default).
RESCALE_EPS = 1e-10


@dataclass(frozen=True)
class _Op:
    kind: str
    label: str  # for messages: "layer 'features.0' (Conv2d)", "function add", "method view"
    run: Runner  # out-of-place; called with the node's args and kwargs (values)
    module: nn.Module | None = None


@dataclass(frozen=True)
class _Layer:
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
        self.ops: dict[fx.Node, _Op] = {}
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

    def op(self, node: fx.Node) -> _Op | None:
        """The operation of an active node; ``None`` for metadata; an error when unsupported."""
        if node in self.ops:
            return self.ops[node]
        op = self._classify(node)
        if op is not None:
            self.ops[node] = op
        return op

    def _classify(self, node: fx.Node) -> _Op | None:
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
                    return _Op(kind, label, runner, module)
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

            return _Op(kind, label, run_method)
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
        return _Op(kind, label, runner)

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
            "service.explain.methods.propagation)"
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

    def layer(self, node: fx.Node, env: dict[fx.Node, Any]) -> _Layer:
        """The convolution or linear layer of a WEIGHTED node."""
        op = self.ops[node]
        if op.module is not None:
            module = op.module
            (source,) = self.parents(node)
            if isinstance(module, nn.Linear):
                return _Layer("linear", source, module.weight, module.bias, F.linear, op.label)
            conv = module

            def apply_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
                return conv._conv_forward(x, weight, bias)  # type: ignore[operator]

            return _Layer("conv", source, module.weight, module.bias, apply_conv, op.label)
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

        return _Layer(
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
            if op.kind in _LINEAR_KINDS:
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

    def rule_for(self, layer: _Layer, reads_input: bool) -> str:
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
    def _fold(layer: _Layer, batchnorm: nn.Module | None) -> _Layer:
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
        return _Layer(layer.kind, layer.input, weight.detach(), bias.detach(), layer.apply, layer.label)

    def _layer_rule(
        self, rule: str, layer: _Layer, x: torch.Tensor, relevance: torch.Tensor, inputs: torch.Tensor
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
