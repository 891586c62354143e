"""Incremental inference for occlusion: the forward pass of an input that differs from a clean one
only inside a box recomputes, layer by layer, only the region that box can reach.

Occlusion asks the network about thousands of inputs that each differ from the image in one
window. A convolution's output changes only where its receptive field meets the change, so each
layer can take the clean pass's values everywhere else and recompute a box that grows by the
kernel's reach and shrinks with the stride (Nakandala, Kumar & Papakonstantinou, "Incremental and
Approximate Inference for Faster Occlusion-based Deep CNN Explanations", SIGMOD 2019). The result
is the same forward pass, to floating-point rounding; what it saves is the arithmetic outside the
boxes, most in the early, large feature maps (half or more of a 3D DenseNet121's at 96³ for a
window of an eighth of the volume).

The network is traced with :mod:`torch.fx`. Convolutions (zero padding), max and average pooling
and pointwise layers (eval-mode batch norm, activations, dropout, identity), channel
concatenation and element-wise arithmetic work on boxes; any other operation on a changed value
(a global pool, a norm over space, a reshape) first pastes the box into the clean value and goes on
whole, so every traceable network gives the full pass's answer. :meth:`IncrementalForward.trace`
returns ``None`` for a network ``torch.fx`` cannot trace (data-dependent control flow, a
TorchScript module): the caller then runs whole forward passes.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

#: Modules that act on each element (or each channel of each element) alone, in eval mode.
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.PReLU,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)
_POINTWISE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {F.relu, torch.relu, F.leaky_relu, F.elu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.relu6, F.dropout}
)
_POINTWISE_METHODS: frozenset[str] = frozenset({"relu", "sigmoid", "tanh", "contiguous", "float"})
_ARITHMETIC: frozenset[Callable[..., Any]] = frozenset(
    {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}
)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_MAX_POOL_FUNCTIONS: dict[int, Callable[..., torch.Tensor]] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_AVG_POOL_FUNCTIONS: dict[int, Callable[..., torch.Tensor]] = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


#: The graph of each network traced so far (``None``: not traceable), for as long as the network lives.
_TRACED: weakref.WeakKeyDictionary[nn.Module, fx.GraphModule | None] = weakref.WeakKeyDictionary()

#: A box covering this share of its layer's grid or more is pasted whole: reading regions around
#: it costs more than the arithmetic it saves (CPU time of 16 windows of 16³ in a 96³ DenseNet121:
#: whole passes 10.8 s; boxes to the end 4.6 s; pasted whole from half the grid 3.8 s, from 0.35 5.2 s).
WHOLE_FROM = 0.5


@dataclass(frozen=True)
class _Boxed:
    """A layer's value for ``N`` changed inputs: the clean value of their images everywhere, except
    in one box per input, of the same ``size`` for all, starting at ``start[n]``.

    ``clean`` is ``[B, C, *spatial]`` (the clean pass of the B images), ``image`` ``[N]`` the image
    of each input, ``start`` ``[N, d]`` voxel offsets on this layer's grid, ``values``
    ``[N, C, *size]``.
    """

    clean: torch.Tensor
    image: torch.Tensor
    start: torch.Tensor
    values: torch.Tensor

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(self.values.shape[2:])

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(self.clean.shape[2:])

    def whole(self) -> torch.Tensor:
        """``[N, C, *spatial]``: the clean values with each box pasted in."""
        merged = self.clean[self.image].clone()
        for n, start in enumerate(self.start.tolist()):
            box = tuple(slice(first, first + extent) for first, extent in zip(start, self.size))
            merged[(n, slice(None), *box)] = self.values[n]
        return merged

    def region(self, start: torch.Tensor, size: Sequence[int], fill: float) -> torch.Tensor:
        """``[N, C, *size]``: this value on the box of ``size`` at ``start[n]`` (``[N, d]``, may
        reach past the grid, where it reads ``fill``: a layer's padding)."""
        if tuple(size) == self.size and torch.equal(start, self.start):
            return self.values
        channels = self.clean.shape[1]
        on_grid = bool((start >= 0).all()) and all(
            int(start[:, k].max()) + size[k] <= self.grid[k] for k in range(len(size))
        )
        # Every element is written below when the region lies on the grid; else the rest is padding.
        shape = (len(start), channels, *size)
        out = self.values.new_empty(shape) if on_grid else self.values.new_full(shape, fill)
        images, boxes = self.image.tolist(), self.start.tolist()
        for n, first in enumerate(start.tolist()):
            # The clean value where the region meets the grid, then the box where it meets the box.
            for origin, extent, source in (
                (0, self.grid, self.clean[images[n]]),
                (boxes[n], self.size, self.values[n]),
            ):
                if isinstance(origin, int):
                    origin = [0] * len(size)
                overlap = _overlap(first, size, origin, extent)
                if overlap is not None:
                    into, taken = overlap
                    out[(n, slice(None), *into)] = source[(slice(None), *taken)]
        return out


def _overlap(
    first: Sequence[int], size: Sequence[int], origin: Sequence[int], extent: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Where the box ``[first, first + size)`` meets ``[origin, origin + extent)``: the slices
    into each box, or ``None`` when they do not meet."""
    into, taken = [], []
    for a, length, b, other in zip(first, size, origin, extent):
        low, high = max(a, b), min(a + length, b + other)
        if high <= low:
            return None
        into.append(slice(low - a, high - a))
        taken.append(slice(low - b, high - b))
    return tuple(into), tuple(taken)


def _same_boxes(starts: torch.Tensor, stops: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """One box size for all inputs: each input's box ``[start, stop)`` widened to the largest, kept
    on the grid (recomputing more than changed is still exact)."""
    size = [max(1, min(int((stops[:, k] - starts[:, k]).max()), grid[k])) for k in range(len(grid))]
    limit = torch.tensor([g - s for g, s in zip(grid, size)], device=starts.device)
    return torch.minimum(starts.clamp_min(0), limit), size


def _sliding_geometry(module: nn.Module, dims: int) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """Kernel, stride, padding and dilation per axis of a convolution or pooling layer, or
    ``None`` where its padding is not the plain kind a box can reproduce."""

    def per_axis(value: Any) -> list[int]:
        return list(value) if isinstance(value, (tuple, list)) else [int(value)] * dims

    if isinstance(module, _CONVOLUTIONS):
        plain = module.padding_mode == "zeros" and not isinstance(module.padding, str)
        dilation = per_axis(module.dilation)
    elif isinstance(module, _MAX_POOLS):
        plain, dilation = not module.ceil_mode, per_axis(module.dilation)
    elif isinstance(module, _AVG_POOLS):
        plain = not module.ceil_mode and (module.count_include_pad or not any(per_axis(module.padding)))
        dilation = [1] * dims
    else:
        return None
    if not plain:
        return None
    return per_axis(module.kernel_size), per_axis(module.stride), per_axis(module.padding), dilation


class IncrementalForward:
    """Forward passes of a traced network on inputs that each differ from a clean image in a box.

    :meth:`prepare` runs the clean pass of a batch of images and keeps every layer's value;
    :meth:`forward` then takes, for ``N`` changed inputs, the image of each, the start of its box
    and the box's new values, and returns the network's outputs ``[N, ...]``, equal to
    ``model(changed inputs)``. Call under ``torch.no_grad()`` with the model in eval mode.
    """

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self._module = graph_module
        self._nodes = list(graph_module.graph.nodes)
        self._modules = dict(graph_module.named_modules())
        self._clean: dict[fx.Node, Any] = {}
        self._changes: set[fx.Node] = set()
        # The values each node is the last to read: dropped once it ran, as the network drops them.
        last_reader: dict[fx.Node, fx.Node] = {}
        for node in self._nodes:
            for argument in node.all_input_nodes:
                last_reader[argument] = node
        self._done_after: dict[fx.Node, list[fx.Node]] = {node: [] for node in self._nodes}
        for value, reader in last_reader.items():
            self._done_after[reader].append(value)

    @classmethod
    def trace(cls, model: nn.Module) -> IncrementalForward | None:
        """The engine for ``model``, or ``None`` when :mod:`torch.fx` cannot trace it to a graph
        with one input. Tracing runs ``model.forward`` once with symbolic values: a forward with
        side effects (one that records its inputs) sees them."""
        if isinstance(model, torch.jit.ScriptModule):
            return None
        if model not in _TRACED:  # traced once per network (its modules, weights included, are shared)
            try:
                graph_module: fx.GraphModule | None = fx.symbolic_trace(model)
            except Exception:  # noqa: BLE001 - any tracing failure means: run whole passes
                graph_module = None
            if graph_module is not None and (
                sum(n.op == "placeholder" for n in graph_module.graph.nodes) != 1
                or any(_mutates_a_value_read_again(n) for n in graph_module.graph.nodes)
            ):
                graph_module = None
            _TRACED[model] = graph_module
        traced = _TRACED[model]
        return None if traced is None else cls(traced)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Run and keep the clean pass of ``images`` ``[B, C, *spatial]``; return its output."""
        self._clean = {}
        self._changes = set()
        output: Any = None
        for node in self._nodes:
            if node.op == "placeholder":
                value: Any = images
                self._changes.add(node)
            elif node.op == "output":
                output = self._load(node.args[0], self._clean)
                continue
            else:
                value = self._run_whole(node, self._clean)
                if any(arg in self._changes for arg in node.all_input_nodes):
                    self._changes.add(node)
            self._clean[node] = value
        return output

    def forward(self, image: torch.Tensor, start: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Outputs for inputs equal to clean image ``image[n]`` except ``values[n]`` in the box at
        ``start[n]`` (``[N, d]``, voxels). :meth:`prepare` first."""
        if not self._clean:
            raise RuntimeError("IncrementalForward.prepare must run the clean pass first")
        current: dict[fx.Node, Any] = {}
        output: Any = None
        for node in self._nodes:
            if node.op == "output":
                output = self._load(node.args[0], current, whole=True)
            elif node not in self._changes:
                current[node] = self._clean[node]
            elif node.op == "placeholder":
                current[node] = _Boxed(self._clean[node], image, start, values)
            else:
                current[node] = self._run_boxed(node, current)
            for finished in self._done_after[node]:
                del current[finished]
        return output

    # -- one node ----------------------------------------------------------------------------

    def _load(self, argument: Any, values: dict[fx.Node, Any], whole: bool = False) -> Any:
        def value_of(node: fx.Node) -> Any:
            value = values[node]
            return value.whole() if whole and isinstance(value, _Boxed) else value

        return fx.node.map_arg(argument, value_of)

    def _run_whole(self, node: fx.Node, values: dict[fx.Node, Any]) -> Any:
        """``node`` as the network runs it, every changed argument pasted whole."""
        args = self._load(node.args, values, whole=True)
        kwargs = self._load(node.kwargs, values, whole=True)
        if node.op == "get_attr":
            target: Any = self._module
            for part in str(node.target).split("."):
                target = getattr(target, part)
            return target
        module = self._modules[str(node.target)] if node.op == "call_module" else None
        if _in_place(node, module):
            # It would overwrite the value kept for the node before it (read by no other node:
            # :meth:`trace` declines graphs where it is).
            args = tuple(arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args)
        if module is not None:
            return module(*args, **kwargs)
        if node.op == "call_method":
            receiver, *rest = args
            return getattr(receiver, str(node.target))(*rest, **kwargs)
        assert callable(node.target)
        return node.target(*args, **kwargs)

    def _run_boxed(self, node: fx.Node, values: dict[fx.Node, Any]) -> Any:
        """``node`` on boxes where its kind allows, else whole."""
        changed = [values[arg] for arg in node.all_input_nodes if isinstance(values[arg], _Boxed)]
        if not changed or any(
            arg in self._changes and not isinstance(values[arg], _Boxed) for arg in node.all_input_nodes
        ):
            # A changed argument already whole: the others are pasted whole too.
            return self._run_whole(node, values)
        boxed = changed[0]
        if node.op == "call_module":
            module = self._modules[str(node.target)]
            if isinstance(module, _POINTWISE_MODULES) and len(node.args) == 1 and not node.kwargs:
                return self._boxed(node, boxed.image, boxed.start, module(boxed.values.clone()))
            geometry = _sliding_geometry(module, len(boxed.grid))
            if geometry is not None and len(node.args) == 1 and not node.kwargs:
                return self._slide(node, module, boxed, *geometry)
        elif node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS:
            if node.args and node.args[0] is node.all_input_nodes[0] and len(node.all_input_nodes) == 1:
                rest, kwargs = self._load(node.args[1:], values), self._load(node.kwargs, values)
                # On a copy: an in-place activation must not change the box kept for the layer before.
                return self._boxed(node, boxed.image, boxed.start, node.target(boxed.values.clone(), *rest, **kwargs))
        elif node.op == "call_method" and node.target in _POINTWISE_METHODS and len(node.args) == 1:
            return self._boxed(node, boxed.image, boxed.start, getattr(boxed.values, str(node.target))())
        elif node.op == "call_function" and node.target in _ARITHMETIC and not node.kwargs:
            merged = self._merge(node, values, node.args)
            if merged is not None:
                image, start, operands = merged
                return self._boxed(node, image, start, node.target(*operands))
        elif node.op == "call_function" and node.target is torch.cat:
            merged = self._concatenate(node, values)
            if merged is not None:
                return merged
        return self._run_whole(node, values)

    def _boxed(
        self, node: fx.Node, image: torch.Tensor, start: torch.Tensor, values: torch.Tensor
    ) -> _Boxed | torch.Tensor:
        """``node``'s value: boxes in its clean value, or whole from the layer where the box covers
        :data:`WHOLE_FROM` of the grid (from there on the layers run as the network does)."""
        grid = tuple(self._clean[node].shape[2:])
        if tuple(values.shape[2:]) == grid:
            return values
        boxed = _Boxed(self._clean[node], image, start, values)
        return boxed.whole() if math.prod(boxed.size) >= WHOLE_FROM * math.prod(grid) else boxed

    def _slide(
        self,
        node: fx.Node,
        module: nn.Module,
        boxed: _Boxed,
        kernel: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
    ) -> _Boxed | torch.Tensor:
        """A convolution or pooling layer on the box its changed input reaches."""
        grid_out = tuple(self._clean[node].shape[2:])
        reach = torch.tensor([d * (k - 1) + 1 for k, d in zip(kernel, dilation)], device=boxed.start.device)
        step = torch.tensor(stride, device=boxed.start.device)
        pad = torch.tensor(padding, device=boxed.start.device)
        low = boxed.start
        high = boxed.start + torch.tensor(boxed.size, device=low.device)
        # Outputs o read inputs [o*s - p, o*s - p + reach): those meeting [low, high) change.
        first = torch.div(low + pad - reach + step, step, rounding_mode="floor").clamp_min(0)
        stop = torch.div(high - 1 + pad, step, rounding_mode="floor") + 1
        start, size = _same_boxes(first, stop, grid_out)
        read_size = [(n - 1) * s + r for n, s, r in zip(size, stride, reach.tolist())]
        fill = -math.inf if isinstance(module, _MAX_POOLS) else 0.0
        region = boxed.region(start * step - pad, read_size, fill)
        dims = len(grid_out)
        if isinstance(module, _CONVOLUTIONS):
            result = _CONV_FUNCTIONS[dims](region, module.weight, module.bias, stride, 0, dilation, module.groups)
        elif isinstance(module, _MAX_POOLS):
            result = _MAX_POOL_FUNCTIONS[dims](region, kernel, stride, 0, dilation)
        else:
            assert isinstance(module, _AVG_POOLS)
            divisor = getattr(module, "divisor_override", None)
            extra = {"divisor_override": divisor} if dims > 1 else {}
            result = _AVG_POOL_FUNCTIONS[dims](region, kernel, stride, 0, False, True, **extra)
        return self._boxed(node, boxed.image, start, result)

    def _common_box(self, node: fx.Node, parts: Sequence[_Boxed]) -> tuple[torch.Tensor, list[int]]:
        """One box on ``node``'s grid covering the boxes of ``parts``: its starts ``[N, d]`` and size."""
        first = torch.stack([part.start for part in parts]).amin(0)
        stop = torch.stack([part.start + torch.tensor(part.size, device=part.start.device) for part in parts]).amax(0)
        return _same_boxes(first, stop, tuple(self._clean[node].shape[2:]))

    def _merge(
        self, node: fx.Node, values: dict[fx.Node, Any], arguments: Sequence[Any]
    ) -> tuple[torch.Tensor, torch.Tensor, list[Any]] | None:
        """Element-wise arithmetic: boxed operands read on a common box, plain numbers passed on;
        ``None`` for a tensor operand (it may broadcast over space) or a box on another grid."""
        loaded = [values[arg] if isinstance(arg, fx.Node) else arg for arg in arguments]
        parts = [value for value in loaded if isinstance(value, _Boxed)]
        grid = tuple(self._clean[node].shape[2:])
        if any(isinstance(value, torch.Tensor) for value in loaded) or any(part.grid != grid for part in parts):
            return None
        start, size = self._common_box(node, parts)
        operands = [value.region(start, size, 0.0) if isinstance(value, _Boxed) else value for value in loaded]
        return parts[0].image, start, operands

    def _concatenate(self, node: fx.Node, values: dict[fx.Node, Any]) -> _Boxed | torch.Tensor | None:
        """``torch.cat`` along channels of values on one grid (a dense block), on their common
        box; ``None`` for any other concatenation."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim != 1 or not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            return None
        grid = tuple(self._clean[node].shape[2:])
        loaded = [values[tensor] for tensor in tensors]
        if any(isinstance(v, torch.Tensor) and tuple(v.shape[2:]) != grid for v in loaded) or any(
            isinstance(v, _Boxed) and v.grid != grid for v in loaded
        ):
            return None
        parts = [value for value in loaded if isinstance(value, _Boxed)]
        image = parts[0].image
        start, size = self._common_box(node, parts)
        pieces = [
            value.region(start, size, 0.0) if isinstance(value, _Boxed) else boxes_of(value, image, start, size)
            for value in loaded
        ]
        return self._boxed(node, image, start, torch.cat(pieces, 1))


def _in_place(node: fx.Node, module: nn.Module | None = None) -> bool:
    """Whether ``node`` writes into its input: a layer with ``inplace=True``, a function called
    with ``inplace=True``, or a method such as ``relu_``."""
    name = str(node.target)
    return bool(
        getattr(module, "inplace", False)
        or node.kwargs.get("inplace") is True
        or (node.op == "call_method" and name.endswith("_") and not name.startswith("__"))
    )


def _mutates_a_value_read_again(node: fx.Node) -> bool:
    """An in-place ``node`` whose input another node also reads: the network's answer then
    depends on the order of the writes, which boxes do not keep."""
    if node.op not in ("call_module", "call_function", "call_method") or not node.all_input_nodes:
        return False
    module = node.graph.owning_module.get_submodule(str(node.target)) if node.op == "call_module" else None
    return _in_place(node, module) and len(node.all_input_nodes[0].users) > 1


def boxes_of(images: torch.Tensor, image: torch.Tensor, corner: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    """``[n, C, *box]``: the box of size ``box`` at ``corner[i]`` (on the grid) of image
    ``image[i]`` of ``images`` ``[B, C, *spatial]``."""
    return torch.stack(
        [
            images[(index, slice(None), *(slice(first, first + size) for first, size in zip(start, box)))]
            for index, start in zip(image.tolist(), corner.tolist())
        ]
    )


__all__ = ["WHOLE_FROM", "IncrementalForward", "boxes_of"]
