"""The pooled GPU tier: a model's graphs served by Triton Inference Server, reached over gRPC.

With ``model.triton_url`` set, every worker process is a ``tritonclient`` client of one Triton
server, whose dynamic batcher merges the forward passes of all of them into large batches (what
keeps a GPU busy); without it the in-process pool (:mod:`service.inference.pool`) runs the model.
The server holds the graphs :func:`service.inference.graphs.export_graphs` writes
(:mod:`service.tools.triton.serve`):

- the classifier: :class:`TritonRunner`, a :class:`~service.inference.runner.Runner` (predictions
  and the forward passes of the perturbation methods);
- the CAM family's layer gradients: :class:`TritonLayerGradients`, the target layer's activations
  and d(target logit)/d(activations) per image, from which Grad-CAM and Grad-CAM++ weight the
  channels (:class:`ServedGradientModel` hands both to the explainers, with the worker's own
  eager module, loaded on first use, for the methods that back-propagate to the input).

Each request holds at most the server's ``max_batch_size`` for its model, read from the server's
model configuration once per connection (a new connection after a failure reads it again: the
server may have restarted with another export), and at most ``max_batch`` when the client sets it;
larger calls are split and the parts concatenated in order. The server's dynamic batcher merges
the parts of all clients again, so splitting costs round trips, never batch size on the GPU.

A server that does not answer (or is still loading its models) is retried ``retries`` times with
a doubling delay; then :class:`TritonUnavailableError` names the URL and what to do. The node does
not journal the instance failed for it (nothing is wrong with the instance): the batch's unfinished
instances stay ``received`` and are processed again after a pause
(``service.node.processor.RETRY_LATER``). ``tritonclient`` is the ``triton`` extra, imported only
when a URL is configured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.inference.card import ModelCard
from service.inference.graphs import model_names
from service.inference.runner import Runner

log = logging.getLogger(__name__)


class TritonUnavailableError(RuntimeError):
    """The Triton server did not answer (down, restarting, unreachable) within the retries."""


class TritonModelError(RuntimeError):
    """The Triton server answered with an error (model missing, wrong shape): retrying will not help."""


@dataclass(frozen=True)
class TritonSettings:
    """Where the Triton server is and how long to wait for it."""

    #: gRPC ``host:port``, e.g. ``triton:8001``.
    url: str
    #: Seconds one request may take (a full batch of the largest model included).
    timeout_seconds: float = 60.0
    #: Attempts after the first when the server does not answer, with a doubling delay.
    retries: int = 4
    #: The first delay between attempts, seconds; it doubles up to ``max_retry_delay_seconds``.
    retry_delay_seconds: float = 0.5
    max_retry_delay_seconds: float = 5.0
    #: Images per request at most on this client's side, or ``None``: the server's ``max_batch_size``
    #: alone (read from its model configuration) bounds a request; larger calls are split either way.
    max_batch: int | None = None


def _grpc() -> Any:
    try:
        import tritonclient.grpc as grpcclient  # the 'triton' extra; only needed with model.triton_url
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise TritonUnavailableError(
            "model.triton_url is set but tritonclient is not installed: pip install 'pacs-xai[triton]'"
        ) from exc
    return grpcclient


class TritonClient:
    """One gRPC connection to a Triton server, with retries on an unreachable server."""

    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        self._grpc = _grpc()
        self._client = self._grpc.InferenceServerClient(url=settings.url)
        #: Each model's ``max_batch_size`` as this connection's server reported it.
        self._max_batch: dict[str, int] = {}

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
        """``outputs`` of ``model`` for ``inputs`` (the first dimension is the batch), in requests
        of at most :meth:`request_limit` rows, the parts concatenated in order."""
        limit = self.request_limit(model)
        try:
            return self._in_parts(model, inputs, outputs, limit)
        except TritonModelError:
            # The server behind this connection may have restarted with another export (gRPC
            # reconnects on its own): a refusal asks its limit again, and a new one is obeyed.
            self._max_batch.pop(model, None)
            if self.request_limit(model) == limit:
                raise
            return self._in_parts(model, inputs, outputs, self.request_limit(model))

    def _in_parts(
        self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...], limit: int
    ) -> list[np.ndarray]:
        rows = len(next(iter(inputs.values())))
        parts = [
            self._send(model, {name: array[i : i + limit] for name, array in inputs.items()}, outputs)
            for i in range(0, rows, limit)
        ]
        return [np.concatenate(output) for output in zip(*parts)]

    def request_limit(self, model: str) -> int:
        """Rows per request to ``model``: the server's ``max_batch_size`` for it (asked once per
        connection), capped by ``settings.max_batch`` when set."""
        if model not in self._max_batch:
            config = self._retried(
                model, lambda: self._client.get_model_config(model, client_timeout=self.settings.timeout_seconds)
            )
            served = int(config.config.max_batch_size)
            if served < 1:
                raise TritonModelError(
                    f"Triton at {self.settings.url} serves {model} without batching (max_batch_size {served}); "
                    "serve the graphs of pacs-xai triton export, which batch on the first dimension"
                )
            self._max_batch[model] = served
        cap = self.settings.max_batch
        return self._max_batch[model] if cap is None else min(cap, self._max_batch[model])

    def _send(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
        """One request."""
        requested = [self._grpc.InferRequestedOutput(name) for name in outputs]

        def request() -> list[np.ndarray]:
            tensors = []
            for name, array in inputs.items():
                tensor = self._grpc.InferInput(name, list(array.shape), _triton_type(array))
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            result = self._client.infer(model, tensors, outputs=requested, client_timeout=self.settings.timeout_seconds)
            return [np.asarray(result.as_numpy(name)) for name in outputs]

        return self._retried(model, request)

    def _retried(self, model: str, call: Callable[[], Any]) -> Any:
        """``call()`` (a request about ``model``), retried on a new connection while the server does
        not answer; a refusal from a ready server is :class:`TritonModelError` at once."""
        delay = self.settings.retry_delay_seconds
        for attempt in range(self.settings.retries + 1):
            try:
                return call()
            except Exception as exc:  # tritonclient's InferenceServerException carries a gRPC status
                status = str(getattr(exc, "status", lambda: "")() or "")
                if not _unreachable(status, exc) and self._serving(model):
                    raise TritonModelError(
                        f"Triton at {self.settings.url} refused a request to {model}: {exc}; check that the server "
                        "serves the graphs of this model card (pacs-xai triton export)"
                    ) from exc
                if attempt == self.settings.retries:
                    raise TritonUnavailableError(
                        f"Triton at {self.settings.url} did not answer a request to {model} after "
                        f"{self.settings.retries + 1} attempts ({status or type(exc).__name__}: {str(exc)[:200]}); "
                        "start the server with this model card's graphs (pacs-xai triton serve), or unset "
                        "model.triton_url to run the model in this process"
                    ) from exc
                log.warning("Triton at %s did not answer (%s); retrying in %.1f s", self.settings.url, status, delay)
                time.sleep(delay)
                delay = min(2 * delay, self.settings.max_retry_delay_seconds)
                self._reconnect()
        raise AssertionError("unreachable")  # pragma: no cover

    def _reconnect(self) -> None:
        """A new channel for the next attempt; the old one closed, so a long outage does not
        leave one open per retry (a request another thread has in flight on it fails and is
        retried like any other)."""
        old, self._client = self._client, self._grpc.InferenceServerClient(url=self.settings.url)
        self._max_batch = {}  # the server may be another one now: its limits are asked again
        try:
            old.close()
        except Exception:  # noqa: BLE001 - a channel that cannot close cleanly is gone all the same
            log.debug("closing the old channel to Triton at %s failed", self.settings.url)

    def _serving(self, model: str) -> bool:
        """Whether the server says it and ``model`` are ready: an error from a server that is not
        (stopping: pytriton cancels the requests in flight with an INTERNAL error) is retried like
        no answer; one from a ready server is the request's own fault."""
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(model))
        except Exception:  # not listening any more
            return False

    def close(self) -> None:
        self._client.close()


#: gRPC statuses worth retrying: a server down, busy or restarting (NOT_FOUND: still loading its
#: models after a start; a model it will never serve fails after the retries just the same).
_RETRIED = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND")


def _unreachable(status: str, exc: BaseException) -> bool:
    """True for a server that is down, busy or starting (worth retrying), False for a request it refused."""
    return any(code in status for code in _RETRIED) or (
        "failed to connect" in str(exc).lower() or "connection refused" in str(exc).lower()
    )


def _triton_type(array: np.ndarray) -> str:
    return {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}[array.dtype]


class TritonRunner:
    """The card's classifier on Triton: a forward-only :class:`~service.inference.runner.Runner`."""

    def __init__(self, card: ModelCard, settings: TritonSettings, client: TritonClient | None = None) -> None:
        self._client = client or TritonClient(settings)
        self._model = model_names(card)[0]
        self._classes = len(card.output.classes)
        self._settings = settings

    @property
    def device(self) -> str:
        return f"triton:{self._settings.url}"

    @property
    def torch_module(self) -> None:
        return None

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Logits float32 ``[B, K]`` for a normalised float32 batch, computed by the server."""
        inputs = np.ascontiguousarray(batch, dtype=np.float32)
        if len(inputs) == 0:
            return np.zeros((0, self._classes), dtype=np.float32)
        (logits,) = self._client.infer(self._model, {"images": inputs}, ("logits",))
        return logits.astype(np.float32, copy=False)


class TritonLayerGradients:
    """The CAM family's served graph: target-layer activations and d(target logit)/d(activations)."""

    def __init__(self, card: ModelCard, settings: TritonSettings, client: TritonClient | None = None) -> None:
        if not card.target_layer:
            raise ValueError(f"model card {card.name} names no target_layer: nothing to serve for the CAM methods")
        self._client = client or TritonClient(settings)
        self._model = model_names(card)[1]
        self._settings = settings
        #: The layer (dotted name in the eager network) whose gradients the server computes.
        self.layer: str = card.target_layer
        #: The model's class count: targets are checked against it before a request is sent.
        self.classes: int = len(card.output.classes)

    def __call__(self, images: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Activations and their gradients ``[B, C', h, w]`` for images ``[B, C, H, W]`` and class indices ``[B]``."""
        inputs = np.ascontiguousarray(images, dtype=np.float32)
        indices = np.ascontiguousarray(np.asarray(targets, dtype=np.int64).reshape(-1, 1))
        activations, gradients = self._client.infer(
            self._model, {"images": inputs, "targets": indices}, ("activations", "gradients")
        )
        return activations, gradients


class ServedGradientModel:
    """What a gradient explainer receives when Triton serves the model.

    A :class:`~service.inference.runner.Runner` whose forward passes go to the server, whose
    ``layer_gradients`` serve the CAM family, and whose ``torch_module`` is the worker's own
    eager network (loaded on first use) for the methods that back-propagate to the input.
    """

    def __init__(
        self, runner: Runner, layer_gradients: TritonLayerGradients, local_module: Callable[[], torch.nn.Module]
    ) -> None:
        self._runner = runner
        self.layer_gradients = layer_gradients
        self._local_module = local_module

    @property
    def device(self) -> str:
        return self._runner.device

    @property
    def torch_module(self) -> torch.nn.Module:
        return self._local_module()

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self._runner.forward(batch)
