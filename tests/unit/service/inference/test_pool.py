"""The inference pool: batching across callers, same results as unbatched, back-pressure, clean shutdown."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from service.explain import get_explainer
from service.inference.backends import load_runner
from service.inference.card import ModelCard
from service.inference.pool import InferencePool, PoolBusyError, PoolClosedError
from service.models import demo_card_path
from service.node.metrics import create_metrics


class ObservedRunner:
    """The real ONNX runner of the demo model, noting each forward pass's batch size (and able to be slow)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.inner = load_runner(ModelCard.load(demo_card_path()), "onnx")
        self.sizes: list[int] = []
        self.delay = delay

    device = property(lambda self: self.inner.device)
    torch_module = None

    def forward(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        time.sleep(self.delay)
        return self.inner.forward(batch)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(16, 1, 224, 224)).astype(np.float32)


def test_concurrent_requests_are_batched_and_equal_unbatched_runs(images: np.ndarray) -> None:
    runner = ObservedRunner()
    metrics = create_metrics()
    pool = InferencePool(runner, max_batch=16, max_wait_ms=50, metrics=metrics.pool)
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(8)

    def request(index: int) -> None:
        barrier.wait()
        results[index] = pool.forward(images[2 * index : 2 * index + 2])

    threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.close()
    assert max(runner.sizes) > 2, f"no batching across callers: batch sizes {runner.sizes}"
    assert sum(runner.sizes) == 16
    for index in range(8):
        expected = runner.inner.forward(images[2 * index : 2 * index + 2])
        np.testing.assert_allclose(results[index], expected, rtol=1e-4, atol=1e-4)
    observed = metrics.registry.get_sample_value("pacsxai_pool_batch_size_count")
    assert observed == len(runner.sizes)
    assert metrics.registry.get_sample_value("pacsxai_pool_queue_depth") == 0


def test_large_requests_are_split_to_the_maximum_batch(images: np.ndarray) -> None:
    runner = ObservedRunner()
    pool = InferencePool(runner, max_batch=4, max_wait_ms=0)
    out = pool.forward(images[:10])
    pool.close()
    assert max(runner.sizes) <= 4 and sum(runner.sizes) == 10
    np.testing.assert_allclose(out, runner.inner.forward(images[:10]), rtol=1e-4, atol=1e-4)


def test_a_full_queue_pushes_back(images: np.ndarray) -> None:
    runner = ObservedRunner(delay=0.5)
    pool = InferencePool(runner, max_batch=2, max_wait_ms=0, max_queue=2, submit_timeout=0.2)
    first = threading.Thread(target=pool.forward, args=(images[:2],))
    first.start()
    time.sleep(0.1)  # the slow runner holds the first request: its 2 images fill the queue's 2 places
    started = time.monotonic()
    with pytest.raises(PoolBusyError, match="overloaded"):
        pool.forward(images[4:6])
    assert 0.15 < time.monotonic() - started < 0.45, "the caller should wait for the submit timeout, then give up"
    first.join()
    assert len(pool.forward(images[4:6])) == 2, "room again once the first request is done"
    pool.close()


def test_runner_errors_reach_every_caller_and_nobody_hangs() -> None:
    class Failing(ObservedRunner):
        def forward(self, batch: np.ndarray) -> np.ndarray:
            raise RuntimeError("device lost")

    pool = InferencePool(Failing(), max_batch=4, max_wait_ms=0)
    with pytest.raises(RuntimeError, match="device lost"):
        pool.forward(np.zeros((2, 1, 224, 224), dtype=np.float32))
    pool.close()


def test_close_leaves_no_thread_and_refuses_new_work(images: np.ndarray) -> None:
    before = {t.name for t in threading.enumerate()}
    pool = InferencePool(ObservedRunner(), max_batch=4)
    pool.forward(images[:1])
    pool.close()
    pool.close()  # idempotent
    after = {t.name for t in threading.enumerate() if t.is_alive()}
    assert not {name for name in after - before if name.startswith("pacs-xai-pool")}
    with pytest.raises(PoolClosedError):
        pool.forward(images[:1])


def test_occlusion_through_the_pool_equals_occlusion_on_the_runner(images: np.ndarray) -> None:
    runner = ObservedRunner()
    pool = InferencePool(runner, max_batch=32, max_wait_ms=1)
    occlusion = get_explainer("occlusion", window=32, stride=32)
    batch = torch.from_numpy(images[:2])
    direct = occlusion.explain(runner.inner, batch, [1, 2])
    pooled = occlusion.explain(pool, batch, [1, 2])
    pool.close()
    torch.testing.assert_close(pooled, direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"max_batch": 8, "max_queue": 4}, "max_queue"),
    ],
)
def test_settings_are_validated(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        InferencePool(ObservedRunner(), **kwargs)
