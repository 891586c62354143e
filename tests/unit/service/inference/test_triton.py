"""The Triton client without a server: nothing listening is retried, then a clear error; large
calls are split into requests of at most the server's max_batch_size (asked once per connection)
and the client's own cap; a deployed model without a URL is
today's in-process one. (The real server: tests/integration/test_triton.py.)"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch

from service.inference.card import ModelCard
from service.inference.deployed import DeployedModel
from service.inference.pool import InferencePool
from service.inference.triton import (
    TritonLayerGradients,
    TritonModelError,
    TritonRunner,
    TritonSettings,
    TritonUnavailableError,
)
from service.models import demo_card_path


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.load(demo_card_path())


def test_nothing_listening_is_retried_then_an_error_naming_the_url_and_what_to_do(card: ModelCard) -> None:
    url = f"127.0.0.1:{closed_port()}"
    settings = TritonSettings(url, retries=2, retry_delay_seconds=0.2, timeout_seconds=5)
    started = time.monotonic()
    with pytest.raises(TritonUnavailableError) as raised:
        TritonRunner(card, settings).forward(np.zeros((1, 1, 224, 224), np.float32))
    message = str(raised.value)
    assert url in message and "after 3 attempts" in message and "model.triton_url" in message
    assert 0.6 <= time.monotonic() - started < 10  # 0.2 + 0.4 s of waiting between the three attempts
    with pytest.raises(TritonUnavailableError, match=url):
        TritonLayerGradients(card, settings)(np.zeros((1, 1, 224, 224), np.float32), np.zeros(1, np.int64))


def test_a_model_deployed_while_its_server_is_away_starts_and_its_first_pass_waits_for_it(
    card: ModelCard, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker started while Triton restarts: no crash at start (a restart loop); the error comes
    with the first real pass, which the node retries later."""
    url = f"127.0.0.1:{closed_port()}"
    model = DeployedModel(card, device="cpu", triton=TritonSettings(url, retries=0, timeout_seconds=5))
    try:
        assert "warm-up pass skipped, the model server is away" in caplog.text and url in caplog.text
        with pytest.raises(TritonUnavailableError, match=url):
            model.predict(np.zeros((1, 1, 224, 224), np.float32))
        # Forward-only explainers stay on the server, even one that would take a local module.
        assert model.local_module is None
        assert model.model_for(needs_gradients=False, prefers_module=lambda module: True) is model.pool
    finally:
        model.close()


class _Internal(Exception):
    """What tritonclient raises for an INTERNAL status (pytriton cancelling the requests in flight)."""

    def status(self) -> str:
        return "StatusCode.INTERNAL"


class _ScriptedServer:
    """A stand-in for ``tritonclient.grpc.InferenceServerClient``: each infer takes the next
    scripted answer (an exception is raised); readiness as told."""

    answers: list = []
    ready: bool = False
    infers = 0
    max_batch_size = 32
    configs_asked = 0

    def __init__(self, url: str) -> None:
        self.url = url

    def infer(self, model: str, inputs: list, outputs: list, client_timeout: float) -> object:
        type(self).infers += 1
        answer = type(self).answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def get_model_config(self, model: str, client_timeout: float) -> object:
        type(self).configs_asked += 1
        config = type("ModelConfig", (), {"max_batch_size": type(self).max_batch_size})()
        return type("ModelConfigResponse", (), {"config": config})()

    def is_server_ready(self) -> bool:
        return type(self).ready

    def is_model_ready(self, model: str) -> bool:
        return type(self).ready

    def close(self) -> None:
        pass


@pytest.mark.parametrize("ready", [False, True])
def test_an_internal_error_is_retried_only_from_a_server_that_is_not_ready(
    card: ModelCard, monkeypatch: pytest.MonkeyPatch, ready: bool
) -> None:
    """A stopping server cancels the requests in flight with INTERNAL: retried like no answer. The
    same status from a ready server is the request's fault: an error at once, not a retry loop."""
    import tritonclient.grpc as grpcclient

    logits = np.arange(3, dtype=np.float32).reshape(1, 3)
    answered = type("Result", (), {"as_numpy": lambda self, name: logits})()
    monkeypatch.setattr(grpcclient, "InferenceServerClient", _ScriptedServer)
    monkeypatch.setattr(_ScriptedServer, "answers", [_Internal("Cancelled responses handler"), answered])
    monkeypatch.setattr(_ScriptedServer, "ready", ready)
    monkeypatch.setattr(_ScriptedServer, "infers", 0)
    runner = TritonRunner(card, TritonSettings("127.0.0.1:1", retries=2, retry_delay_seconds=0.01))
    if ready:
        with pytest.raises(TritonModelError, match="Cancelled responses handler"):
            runner.forward(np.zeros((1, 1, 224, 224), np.float32))
        assert _ScriptedServer.infers == 1
    else:
        np.testing.assert_array_equal(runner.forward(np.zeros((1, 1, 224, 224), np.float32)), logits)
        assert _ScriptedServer.infers == 2


class _Input:
    """A stand-in for ``tritonclient.grpc.InferInput`` that keeps the array it is given."""

    def __init__(self, name: str, shape: list[int], datatype: str) -> None:
        self.name, self.shape, self.datatype = name, shape, datatype

    def set_data_from_numpy(self, array: np.ndarray) -> None:
        self.array = array.copy()


class _EchoServer(_ScriptedServer):
    """Answers each request with its own images doubled and targets plus one, refusing (as
    Triton does) a request of more rows than its ``max_batch_size``."""

    sizes: list[int] = []

    def infer(self, model: str, inputs: list, outputs: list, client_timeout: float) -> object:
        images, targets = (tensor.array for tensor in inputs)
        if len(images) > type(self).max_batch_size:
            raise _Internal(f"inference request batch-size must be <= {type(self).max_batch_size} for '{model}'")
        type(self).sizes.append(len(images))
        answers = {"activations": images * 2, "gradients": targets + 1}
        return type("Result", (), {"as_numpy": lambda self, name: answers[name]})()


def echo_server(monkeypatch: pytest.MonkeyPatch, max_batch_size: int) -> None:
    import tritonclient.grpc as grpcclient

    monkeypatch.setattr(grpcclient, "InferenceServerClient", _EchoServer)
    monkeypatch.setattr(grpcclient, "InferInput", _Input)
    monkeypatch.setattr(_EchoServer, "max_batch_size", max_batch_size)
    monkeypatch.setattr(_EchoServer, "configs_asked", 0)
    monkeypatch.setattr(_EchoServer, "sizes", [])
    monkeypatch.setattr(_EchoServer, "ready", True)


@pytest.mark.parametrize(("served", "cap", "sizes"), [(4, None, [4, 4, 3]), (8, 3, [3, 3, 3, 2]), (5, 16, [5, 5, 1])])
def test_calls_are_split_at_the_servers_max_batch_size_and_the_clients_cap_in_order(
    card: ModelCard, monkeypatch: pytest.MonkeyPatch, served: int, cap: int | None, sizes: list[int]
) -> None:
    echo_server(monkeypatch, served)
    gradients = TritonLayerGradients(card, TritonSettings("127.0.0.1:1", max_batch=cap))
    images = np.arange(11 * 4, dtype=np.float32).reshape(11, 1, 2, 2)
    targets = np.arange(11) % 3
    for _ in range(2):
        doubled, shifted = gradients(images, targets)
        np.testing.assert_array_equal(doubled, images * 2)
        np.testing.assert_array_equal(shifted, targets.reshape(11, 1) + 1)
    assert _EchoServer.sizes == sizes * 2
    assert _EchoServer.configs_asked == 1  # once per connection, not per call


def test_a_server_restarted_with_a_smaller_batch_limit_is_obeyed(
    card: ModelCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection outlives a server restarted with another export: its refusal of a request
    over the new limit makes the client ask the limit again and split at it."""
    echo_server(monkeypatch, 8)
    gradients = TritonLayerGradients(card, TritonSettings("127.0.0.1:1"))
    images, targets = np.ones((8, 1, 2, 2), np.float32), np.zeros(8, np.int64)
    gradients(images, targets)
    monkeypatch.setattr(_EchoServer, "max_batch_size", 3)
    doubled, _ = gradients(images, targets)
    np.testing.assert_array_equal(doubled, images * 2)
    assert _EchoServer.sizes == [8, 3, 3, 2] and _EchoServer.configs_asked == 2


def test_an_empty_batch_needs_no_server(card: ModelCard) -> None:
    runner = TritonRunner(card, TritonSettings(f"127.0.0.1:{closed_port()}", retries=0))
    assert runner.forward(np.zeros((0, 1, 224, 224), np.float32)).shape == (0, 3)
    assert runner.torch_module is None and runner.device.startswith("triton:127.0.0.1:")


def test_without_a_url_the_model_runs_in_process(card: ModelCard) -> None:
    model = DeployedModel(card, device="cpu")
    try:
        assert model.served_gradients is None
        assert isinstance(model.model_for(needs_gradients=True), torch.nn.Module)
        assert isinstance(model.model_for(needs_gradients=False), InferencePool)
        assert model.forward_runner.device == "CPUExecutionProvider"
    finally:
        model.close()
