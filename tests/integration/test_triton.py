"""The pooled GPU tier against a real Triton server (nvidia-pytriton's bundled tritonserver, on the
CPU, started from .venv-triton on a free loopback port): the classifier, Grad-CAM from the served
layer-gradient graph and occlusion's forward passes equal the in-process model's, calls larger than
the server's max_batch_size included (the client reads it and splits at it); a stopped
server is an error that names it, and a server back within the retries is waited for."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from service.explain.methods.cam import GradCAM, GradCAMPlusPlus
from service.explain.methods.occlusion import Occlusion
from service.inference.backends import load_runner
from service.inference.card import ModelCard
from service.inference.deployed import DeployedModel, PoolSettings
from service.inference.graphs import model_names
from service.inference.triton import (
    ServedGradientModel,
    TritonClient,
    TritonLayerGradients,
    TritonRunner,
    TritonSettings,
    TritonUnavailableError,
)
from service.models import demo_card_path
from service.node.pipeline import ExplainPipeline
from service.synthetic.phantoms import make_phantom
from service.tools.triton.launch import TritonServer, triton_python

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        triton_python() is None,
        reason="no Triton virtualenv (.venv-triton): run `make triton-venv` (make test creates it)",
    ),
]

MAX_BATCH = 8


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.load(demo_card_path())


@pytest.fixture(scope="module")
def server(card: ModelCard, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    running = TritonServer(card, tmp_path_factory.mktemp("triton"), max_batch=MAX_BATCH, threads=1)
    try:
        running.start(wait=False)
        # A client whose retries span the server's start (not listening, then loading its models)
        # waits for it and gets its answer: what a worker sees when Triton restarts.
        patient = TritonRunner(card, TritonSettings(running.url, retries=40, retry_delay_seconds=0.5))
        x = radiograph_like(2, seed=3)
        with torch.no_grad():
            want = load_runner(card, "torch", device="cpu").torch_module(x).numpy()
        np.testing.assert_allclose(patient.forward(x.numpy()), want, rtol=1e-4, atol=1e-4)
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def deployed(card: ModelCard, server: TritonServer) -> Iterator[DeployedModel]:
    model = DeployedModel(
        card,
        device="cpu",
        pool=PoolSettings(max_batch=2 * MAX_BATCH),  # passes of more images than the server takes
        triton=TritonSettings(server.url),  # no cap of its own: requests split at the server's max_batch_size
    )
    yield model
    model.close()


@pytest.fixture(scope="module")
def eager(card: ModelCard) -> torch.nn.Module:
    return load_runner(card, "torch", device="cpu").torch_module


def radiograph_like(n: int, seed: int = 0) -> torch.Tensor:
    """Normalised inputs with structure (blobs on noise), so the maps are not flat."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    batch = torch.randn(n, 1, 224, 224, generator=generator) * 0.3
    for i in range(n):
        cy, cx = torch.randint(40, 184, (2,), generator=generator).tolist()
        batch[i, 0] += 2.0 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 18.0**2))
    return batch


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def test_the_client_splits_at_the_servers_max_batch_size_which_the_server_enforces(
    server: TritonServer, card: ModelCard
) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    classifier, cam = model_names(card)
    client = TritonClient(TritonSettings(server.url))
    assert (client.request_limit(classifier), client.request_limit(cam)) == (MAX_BATCH, MAX_BATCH)
    # One request over the limit, as the client sent when it split at pool.max_batch, is refused.
    raw = grpcclient.InferenceServerClient(server.url)
    images = grpcclient.InferInput("images", [MAX_BATCH + 1, *card.input.shape()], "FP32")
    images.set_data_from_numpy(radiograph_like(MAX_BATCH + 1).numpy())
    try:
        with pytest.raises(InferenceServerException, match=str(MAX_BATCH)):
            raw.infer(classifier, [images])
    finally:
        raw.close()
        client.close()


def test_the_classifier_on_triton_equals_the_in_process_model(deployed: DeployedModel, eager: torch.nn.Module) -> None:
    assert deployed.forward_runner.device.startswith("triton:")
    x = radiograph_like(2 * MAX_BATCH + 3)  # over the server's max_batch_size: split into three requests
    served = deployed.forward_runner.forward(x.numpy())
    with torch.no_grad():
        want = eager(x).numpy()
    np.testing.assert_allclose(served, want, rtol=1e-4, atol=1e-4)
    onnx = load_runner(deployed.card, "onnx", device="cpu").forward(x.numpy())
    np.testing.assert_allclose(served, onnx, rtol=1e-4, atol=1e-4)
    assert [p.class_index for p in deployed.predict(x.numpy())] == want.argmax(1).tolist()


@pytest.mark.parametrize("method", [GradCAM, GradCAMPlusPlus])
def test_cam_from_the_served_graph_equals_the_eager_explainer(
    deployed: DeployedModel, eager: torch.nn.Module, method: type
) -> None:
    model = deployed.model_for(needs_gradients=True)
    assert isinstance(model, ServedGradientModel)
    x, targets = radiograph_like(MAX_BATCH + 2, seed=1), [i % 3 for i in range(MAX_BATCH + 2)]
    explainer = method(target_layer=deployed.card.target_layer)
    served = explainer.explain(model, x, targets)
    want = explainer.explain(eager, x, targets)
    assert want.abs().max() > 0
    assert pearson(served, want) >= 0.999
    torch.testing.assert_close(served, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_occlusion_through_triton_equals_in_process_occlusion(deployed: DeployedModel, eager: torch.nn.Module) -> None:
    x, targets = radiograph_like(1, seed=2), [2]
    explainer = Occlusion(window=56, stride=28)
    served = explainer.explain(deployed.model_for(needs_gradients=False), x, targets)
    want = explainer.explain(eager, x, targets)
    assert want.abs().max() > 0
    assert pearson(served, want) >= 0.999
    torch.testing.assert_close(served, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_the_pipeline_with_triton_writes_the_maps_of_the_in_process_pipeline(
    deployed: DeployedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    send = TritonLayerGradients.__call__

    def counted(self: TritonLayerGradients, images: np.ndarray, targets: np.ndarray) -> tuple:
        calls.append(len(images))
        return send(self, images, targets)

    monkeypatch.setattr(TritonLayerGradients, "__call__", counted)
    local = DeployedModel(deployed.card, device="cpu", pool=PoolSettings(max_batch=MAX_BATCH))
    try:
        phantom = make_phantom(7, "nodule", seed=11).dataset
        results = [ExplainPipeline(model, ["gradcam"], ["pm"]).process(phantom) for model in (deployed, local)]
    finally:
        local.close()
    assert calls == [1]  # the served pipeline's Grad-CAM took its gradients from Triton, the local one did not
    served, want = results
    assert [p.class_index for p in served.predictions] == [p.class_index for p in want.predictions]
    np.testing.assert_allclose(served.predictions[0].probabilities, want.predictions[0].probabilities, atol=1e-5)
    (served_map,), (want_map,) = ([o.dataset.pixel_array for o in r.outputs if o.kind == "pm"] for r in results)
    assert np.abs(want_map).max() > 0
    assert float(np.corrcoef(served_map.ravel(), want_map.ravel())[0, 1]) >= 0.999
    np.testing.assert_allclose(served_map, want_map, rtol=1e-4, atol=1e-4 * float(np.abs(want_map).max()))


def test_a_stopped_server_is_a_clear_error_naming_it(server: TritonServer, card: ModelCard) -> None:
    server.stop()
    runner = TritonRunner(card, TritonSettings(server.url, retries=1, retry_delay_seconds=0.1, timeout_seconds=5))
    with pytest.raises(TritonUnavailableError, match=rf"Triton at {server.url} did not answer .* after 2 attempts"):
        runner.forward(radiograph_like(1).numpy())
