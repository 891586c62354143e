"""The inference pool: one per device, shared by the pipeline and every explainer's forward passes.

Requests from any thread (pipeline workers predicting, perturbation explainers sending their
chunks) are queued; one worker thread per device takes the first request, then keeps adding
queued requests until ``max_batch`` images or ``max_wait_ms`` have passed, runs one forward pass
on the concatenation, and hands each caller its rows. Micro-batching across concurrent studies
is what keeps a GPU busy.

Why one worker thread and not processes: the heavy part (the ONNX Runtime session or the torch
kernels) releases the GIL, so the worker computes while the request threads go on in Python;
the model lives once in memory, and inputs pass by reference, not through pickling as they
would to a process pool. The GIL is only held for the cheap parts (queueing, ``np.concatenate``,
slicing), which are far below a forward pass.

The queue is bounded (``max_queue`` images): a caller that would overfill it waits up to
``submit_timeout`` seconds for room and then gets :class:`PoolBusyError` (back-pressure instead
of unbounded memory). ``close()`` finishes the queued requests, stops the worker and joins it.
The pool itself satisfies the :class:`~service.inference.runner.Runner` protocol, so it can be
handed to anything that takes a runner.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Gauge, Histogram

from service.inference.runner import Runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolMetrics:
    """The pool's Prometheus series (made with the node's other metrics, in its registry)."""

    #: Images per forward pass.
    batch_size: Histogram
    #: Images waiting for a forward pass.
    queue_depth: Gauge


class PoolBusyError(RuntimeError):
    """The pool's queue stayed full for the whole submit timeout."""


class PoolClosedError(RuntimeError):
    """The pool was closed; no more requests are taken."""


@dataclass
class _Request:
    inputs: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class InferencePool:
    """Dynamic micro-batching in front of one runner (one device)."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        submit_timeout: float = 30.0,
        metrics: PoolMetrics | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < max_batch:
            raise ValueError(f"max_queue ({max_queue}) must be >= max_batch ({max_batch})")
        self._runner = runner
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000.0
        self._submit_timeout = submit_timeout
        self._metrics = metrics
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._room = threading.BoundedSemaphore(max_queue)  # one permit per queued image
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._run, name=f"pacs-xai-pool-{runner.device}", daemon=True)
        self._worker.start()
        log.info("inference pool on %s: max batch %d, max wait %.1f ms", runner.device, max_batch, max_wait_ms)

    @property
    def device(self) -> str:
        return self._runner.device

    @property
    def torch_module(self) -> None:
        return None  # the pool serves forward passes only; gradient methods use the runner's module

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Logits for ``batch`` ``[n, C, H, W]``, computed together with other callers' requests."""
        if self._closed.is_set():
            raise PoolClosedError("the inference pool is closed")
        inputs = np.ascontiguousarray(batch, dtype=np.float32)
        if len(inputs) == 0:
            return self._runner.forward(inputs)
        # Large requests are split so that each piece fits the queue and a forward pass.
        pieces = [inputs[i : i + self._max_batch] for i in range(0, len(inputs), self._max_batch)]
        requests = [self._submit(piece) for piece in pieces]
        results = []
        for request in requests:
            request.done.wait()
            if request.error is not None:
                raise request.error
            results.append(request.result)
        return np.concatenate(results)

    def _submit(self, piece: np.ndarray) -> _Request:
        deadline = time.monotonic() + self._submit_timeout
        for _ in range(len(piece)):
            if not self._room.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise PoolBusyError(
                    f"inference pool on {self.device} stayed full for {self._submit_timeout:.0f} s; "
                    "the node is overloaded: add a GPU or a replica, or lower the explainers' sample counts"
                )
        request = _Request(piece)
        self._queue.put(request)
        if self._metrics:
            self._metrics.queue_depth.inc(len(piece))
        return request

    def close(self) -> None:
        """Finish what is queued, stop the worker, join it. Idempotent."""
        if not self._closed.is_set():
            self._closed.set()
            self._queue.put(None)
        self._worker.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            size = len(first.inputs)
            deadline = time.monotonic() + self._max_wait
            stop = False
            while size < self._max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if size + len(nxt.inputs) > self._max_batch:
                    self._run_batch(batch)
                    batch, size = [nxt], len(nxt.inputs)
                    deadline = time.monotonic() + self._max_wait
                    continue
                batch.append(nxt)
                size += len(nxt.inputs)
            self._run_batch(batch)
            if stop:
                self._drain()
                return

    def _drain(self) -> None:
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                self._run_batch([request])

    def _run_batch(self, batch: list[_Request]) -> None:
        sizes = [len(request.inputs) for request in batch]
        try:
            logits = self._runner.forward(np.concatenate([request.inputs for request in batch]))
            offsets = np.cumsum([0, *sizes])
            for request, start, end in zip(batch, offsets[:-1], offsets[1:]):
                request.result = logits[start:end]
        except Exception as exc:  # every waiting caller gets the runner's error, none hangs
            log.exception("forward pass of %d image(s) failed on %s", sum(sizes), self.device)
            for request in batch:
                request.error = exc
        finally:
            for request in batch:
                for _ in range(len(request.inputs)):
                    self._room.release()
                request.done.set()
            if self._metrics:
                self._metrics.queue_depth.dec(sum(sizes))
                self._metrics.batch_size.observe(sum(sizes))
