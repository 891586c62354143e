"""Access to a model's internals for the explainers: layer lookup, activation recording, eval mode.

Everything here leaves the model as it found it: hooks and modes are released on every path,
exceptions included.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from service.explain.base import ExplainerError

#: How many valid layer names an "unknown target layer" error lists.
_NAMES_IN_ERROR = 10


#: The convolution of each number of spatial dimensions (2: images, 3: volumes).
_CONVOLUTIONS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _is_conv(module: nn.Module, spatial_dims: int) -> bool:
    """True for ``nn.Conv2d`` (``nn.Conv3d`` when ``spatial_dims`` is 3) and for a TorchScript
    module compiled from one."""
    conv = _CONVOLUTIONS[spatial_dims]
    if isinstance(module, conv):
        return True
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", None) == conv.__name__


def resolve_module(model: nn.Module, target_layer: str | None, spatial_dims: int = 2) -> nn.Module:
    """The submodule called ``target_layer`` (dotted name as in ``model.named_modules()``).

    ``None`` picks the last ``nn.Conv2d`` (``nn.Conv3d`` for a volume model, ``spatial_dims=3``)
    in registration order (``model.modules()``), which is the deepest convolution of a sequential
    CNN; name the layer explicitly where registration order differs from execution order. Works
    on TorchScript modules too (lookup goes through ``named_modules`` because ``get_submodule``
    is not supported there).
    """
    modules = dict(model.named_modules())
    if target_layer is None:
        convs = [name for name, module in modules.items() if _is_conv(module, spatial_dims)]
        if not convs:
            raise ExplainerError(
                f"{type(model).__name__} has no {_CONVOLUTIONS[spatial_dims].__name__} layer to default to; "
                f"set target_layer to one of: {_some_names(modules)}"
            )
        return modules[convs[-1]]
    if target_layer not in modules:
        raise ExplainerError(
            f"unknown target layer {target_layer!r} in {type(model).__name__}; valid names include: "
            f"{_some_names(modules)}"
        )
    return modules[target_layer]


def _some_names(modules: dict[str, nn.Module]) -> str:
    """The last few non-root module names (the layers nearest the output), comma separated."""
    names = [name for name in modules if name]
    shown = names[-_NAMES_IN_ERROR:]
    more = f" (and {len(names) - len(shown)} more)" if len(names) > len(shown) else ""
    return (", ".join(repr(name) for name in shown) or "(none)") + more


def module_device(module: nn.Module) -> torch.device | None:
    """The device of the module's first parameter or buffer; ``None`` when it has neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own ``training`` flag on exit."""
    saved = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in saved:
            module.training = training


#: A forward hook: ``hook(module, args, output)``; a value it returns replaces the output.
ForwardHook = Callable[[nn.Module, tuple[object, ...], object], object]


def this_thread_only(hook: ForwardHook) -> ForwardHook:
    """``hook`` acting only on forward passes run by the thread that registers it.

    A model is shared: the node's pipeline threads, its start-up warm-up and its inference pool
    run their own forward passes through the same modules, and a module's hooks fire for every
    pass. Forward hooks run in the thread that called the model, so the thread tells whose pass
    it is; other threads' passes go through untouched.
    """
    owner = threading.get_ident()

    @functools.wraps(hook)
    def guarded(module: nn.Module, args: tuple[object, ...], output: object) -> object:
        if threading.get_ident() != owner:
            return None
        return hook(module, args, output)

    return guarded


@dataclass
class LayerCall:
    """One forward call of the recorded layer.

    ``activation`` is a detached copy of the layer's output as the layer produced it (before
    any in-place op downstream, e.g. ``ReLU(inplace=True)``); ``gradient`` is d(score)/d(output)
    once a backward pass has reached the layer, same shape, else ``None``.
    """

    activation: torch.Tensor
    edge: GradientEdge | None
    gradient: torch.Tensor | None = None


@dataclass
class LayerRecorder:
    """Context manager recording a module's forward outputs and the gradients flowing to them.

    The forward hook copies the output and registers a tensor hook on it (not a module backward
    hook): the tensor hook sees the gradient of the output as produced, even when a later
    in-place op rewrites it, and each call of a reused module gets its own record. All hooks
    are removed on exit, exceptions included. TorchScript modules cannot be hooked.

    ``differentiate_from``: the caller runs the forward pass with gradients off, and at that call
    of the layer (0-based) the hook hands on a differentiable copy of the output and switches
    gradients on for the rest of the pass. Autograd then keeps nothing of the layers below
    (activation memory of the whole backbone for a CAM layer near the head) and :meth:`backprop`
    starts from that call; the grad mode found is restored on exit.
    """

    module: nn.Module
    differentiate_from: int | None = None
    calls: list[LayerCall] = field(default_factory=list, init=False)
    _handles: list[RemovableHandle] = field(default_factory=list, init=False, repr=False)
    _grad_mode_before: bool | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> LayerRecorder:
        if isinstance(self.module, torch.jit.ScriptModule):
            raise ExplainerError(
                f"cannot record layer {self.module.original_name} of a TorchScript module: torch does not "
                "support hooks on ScriptModules; use an eager torch module or a forward-only method"
            )
        self.calls.clear()
        self._handles.append(self.module.register_forward_hook(this_thread_only(self._on_forward)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._grad_mode_before is not None:
            torch.set_grad_enabled(self._grad_mode_before)
            self._grad_mode_before = None

    def _on_forward(self, module: nn.Module, inputs: tuple[object, ...], output: object) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            raise ExplainerError(f"layer {type(module).__name__} returns {type(output).__name__}, not a single tensor")
        if len(self.calls) == self.differentiate_from:
            return self._start_graph(output)
        call = LayerCall(activation=output.detach().clone(), edge=None)
        if output.requires_grad:
            call.edge = get_gradient_edge(output)

            def store_gradient(gradient: torch.Tensor) -> None:
                call.gradient = gradient.detach()

            self._handles.append(output.register_hook(store_gradient))
        self.calls.append(call)
        return None

    def _start_graph(self, output: torch.Tensor) -> torch.Tensor:
        """Record ``output`` and return a differentiable copy of it, gradients on from here."""
        self._grad_mode_before = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        # Downstream gets the copy, so nothing rewrites ``output``; a clone of a leaf rather than
        # the leaf itself, because in-place ops downstream (ReLU(inplace=True)) refuse leaves.
        handed_on = output.detach().requires_grad_(True).clone()
        call = LayerCall(activation=output.detach(), edge=get_gradient_edge(handed_on))

        def store_gradient(gradient: torch.Tensor) -> None:
            call.gradient = gradient.detach()

        self._handles.append(handed_on.register_hook(store_gradient))
        self.calls.append(call)
        return handed_on

    def only_call(self) -> LayerCall:
        """The single recorded call; an error when the layer ran zero or several times."""
        if len(self.calls) != 1:
            raise ExplainerError(
                f"layer {type(self.module).__name__} ran {len(self.calls)} times in one forward pass; "
                "choose a target layer that runs exactly once"
            )
        return self.calls[0]

    def backprop(self, score: torch.Tensor) -> None:
        """Back-propagate the scalar ``score`` down to the recorded layer and no further.

        Uses ``torch.autograd.grad`` with the layer's gradient edges as inputs, so nothing is
        accumulated in any ``.grad`` and the layers before the target are not differentiated.
        The gradients land in ``calls[i].gradient`` through the tensor hooks.
        """
        edges = [call.edge for call in self.calls if call.edge is not None]
        if not edges:
            raise ExplainerError(f"output of layer {type(self.module).__name__} does not require gradients")
        torch.autograd.grad(score, edges, allow_unused=True)
        if any(call.gradient is None for call in self.calls):
            raise ExplainerError(f"the target score does not depend on layer {type(self.module).__name__}")
