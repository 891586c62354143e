"""The runner interface: what every model backend offers to the pipeline and the explainers."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    """A loaded classifier that maps a normalised batch to logits.

    ``forward`` takes float32 ``[B, C, H, W]`` (already normalised as the model card says) and
    returns float32 logits ``[B, K]`` as numpy. ``torch_module`` is the differentiable
    ``torch.nn.Module`` behind the runner when there is one (TorchScript/torch runners), or
    ``None`` (ONNX Runtime): gradient explainers need it, forward-only explainers do not.
    """

    @property
    def device(self) -> str:
        """Where the model runs, e.g. ``"cpu"``, ``"cuda:0"``, ``"CUDAExecutionProvider"``."""
        ...

    @property
    def torch_module(self):  # -> torch.nn.Module | None
        ...

    def forward(self, batch: np.ndarray) -> np.ndarray: ...
