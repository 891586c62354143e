"""Repeatability over seeds (against maps recomputed here and SciPy's Spearman) and the agreement of
two model paths (the demo card's ONNX pool against its torch module)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from service.explain import get_explainer
from service.models.demo.network import DemoNet
from service.trust import TrustMetricError
from service.trust.repeatability import model_path_agreement, seed_repeatability, stochastic
from tests.unit.service.trust.conftest import RegionModel, blob_images, region_images, small_net

TARGETS = [0, 2]


def test_stochastic_methods_are_those_with_a_seed() -> None:
    assert all(stochastic(m) for m in ("rise", "lime", "kernel_shap", "smoothgrad"))
    assert not any(stochastic(m) for m in ("gradcam", "occlusion", "saliency"))


def test_seed_repeatability_is_the_mean_pairwise_rank_correlation_over_seeds() -> None:
    model, x = small_net(), blob_images(count=2)
    settings = {"masks": 200}
    result = seed_repeatability(model, "rise", x, TARGETS, seeds=(0, 1, 2), settings=settings)
    maps = [get_explainer("rise", seed=s, **settings).explain(model, x, TARGETS).abs().numpy() for s in (0, 1, 2)]
    expected = [
        np.mean(
            [
                spearmanr(maps[i][b].ravel(), maps[j][b].ravel()).statistic
                for i, j in itertools.combinations(range(3), 2)
            ]
        )
        for b in range(2)
    ]
    np.testing.assert_allclose(result.spearman, expected, rtol=0, atol=1e-12)
    assert result.seeds == (0, 1, 2) and result.ssim.shape == (2,)


def test_more_masks_make_rise_more_repeatable() -> None:
    model, x = RegionModel(), region_images()
    few = seed_repeatability(model, "rise", x, [0, 0], settings={"masks": 20, "centred": True})
    many = seed_repeatability(model, "rise", x, [0, 0], settings={"masks": 800, "centred": True})
    assert (many.spearman > few.spearman + 0.2).all(), (few.spearman, many.spearman)
    assert (many.ssim > few.ssim + 0.3).all(), (few.ssim, many.ssim)


def test_seed_repeatability_errors_name_what_was_found() -> None:
    model, x = small_net(), blob_images(count=2)
    with pytest.raises(TrustMetricError, match="'gradcam' takes no seed setting"):
        seed_repeatability(model, "gradcam", x, TARGETS)
    with pytest.raises(TrustMetricError, match=r"at least 2 distinct seeds, got \[1, 1\]"):
        seed_repeatability(model, "rise", x, TARGETS, seeds=[1, 1])
    with pytest.raises(TrustMetricError, match="not in settings \\(got seed=3\\)"):
        seed_repeatability(model, "rise", x, TARGETS, settings={"seed": 3})


def test_the_onnx_pool_and_the_torch_module_give_the_same_occlusion_maps() -> None:
    from dicom_io.pixels import prepare_frames
    from service.inference.deployed import DeployedModel
    from service.models import demo_card_path
    from tests.helpers import held_out_nodules

    model = DeployedModel.from_card_path(demo_card_path())
    try:
        spec = model.card.input.spec()
        frames = [prepare_frames(p.dataset, spec)[0] for p in held_out_nodules(2)]
        batch = torch.from_numpy(model.normalise(np.stack([frame.model_input for frame in frames])))
        targets = [model.card.output.classes.index("nodule")] * 2
        occlusion = get_explainer("occlusion", window=56, stride=56)
        torch_module = model.gradient_runner.torch_module
        agreement = model_path_agreement(occlusion, model.pool, torch_module, batch, targets)
        scale = occlusion.explain(torch_module, batch, targets).abs().amax(dim=(1, 2)).numpy()
        assert (agreement.max_abs_difference < 1e-3 * scale).all(), (agreement.max_abs_difference, scale)
        assert (agreement.pearson > 0.9999).all()
        torch.manual_seed(0)
        untrained = DemoNet().eval()
        disagreement = model_path_agreement(occlusion, model.pool, untrained, batch, targets)
        assert (disagreement.pearson < 0.9).all(), "a different model must not agree"
        with pytest.raises(TrustMetricError, match="gradcam needs gradients"):
            model_path_agreement(get_explainer("gradcam"), model.pool, torch_module, batch, targets)
    finally:
        model.close()
