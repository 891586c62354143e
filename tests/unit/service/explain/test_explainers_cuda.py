"""Every explainer on a model that lives on a CUDA device: the maps equal the CPU's, and come back
on the device of the batch they were asked for. Skipped without a GPU (CI has none); on a GPU
machine: ``pytest tests/unit/service/explain/test_explainers_cuda.py``.

TF32 convolutions are switched off for the comparison, so the GPU computes in full float32 and
the two devices differ only by the order of float additions.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from service.inference.deployed import DeployedModel
from service.models import demo_card_path
from tests.unit.service.explain.test_explainer_contract import ITERATIVE, METHODS, SHAPES, applies, explainer, make_case

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (run on a GPU machine)", allow_module_level=True)


@pytest.fixture(scope="module")
def deployed_demo() -> Iterator[DeployedModel]:
    deployed = DeployedModel.from_card_path(demo_card_path())
    yield deployed
    deployed.close()


@pytest.fixture(autouse=True)
def full_float32() -> Iterator[None]:
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double().numpy(), b.flatten().double().numpy()
    if a.std() == 0 and b.std() == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_cuda_maps_equal_the_cpu_maps(method: str, shape: str, deployed_demo: DeployedModel) -> None:
    case = make_case(shape, deployed_demo)
    if not applies(method, case, deployed_demo):
        pytest.skip("refused on this model (the contract suite checks the refusal)")
    on_cpu = explainer(method, case).explain(case.model, case.batch, case.targets)
    model = copy.deepcopy(case.model).to("cuda")
    on_gpu = explainer(method, case).explain(model, case.batch.to("cuda"), case.targets)
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape and on_gpu.dtype == torch.float32
    from_host = explainer(method, case).explain(model, case.batch, case.targets)
    assert from_host.device.type == "cpu"  # a host batch gets a host map, whatever the model's device
    for index, (cpu_map, gpu_map) in enumerate(zip(on_cpu, on_gpu.cpu(), strict=True)):
        assert _pearson(cpu_map, gpu_map) > 0.99, f"image {index}: {_pearson(cpu_map, gpu_map):.4f}"
    if method in ITERATIVE:
        # CUDA back-propagation adds with atomics in no fixed order; an optimised mask carries
        # those last-bit differences through its steps, so two GPU runs agree closely, not exactly.
        for index, (first, second) in enumerate(zip(from_host, on_gpu.cpu(), strict=True)):
            assert _pearson(first, second) > 0.99, f"image {index}: {_pearson(first, second):.4f}"
    else:
        torch.testing.assert_close(from_host, on_gpu.cpu(), rtol=1e-3, atol=1e-5 * float(on_cpu.abs().max()))
