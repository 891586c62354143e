"""service.trust.perturbed: the random regions (exact area, contiguous, reproducible), the fill, and the
OOD verdicts on filled images of the demo model (a fill equal to the image changes nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import label

from service.inference.backends import load_runner
from service.inference.card import ModelCard
from service.models import demo_card_path
from service.trust.ood import OodDetector, OodStatistics
from service.trust.perturbed import blob_regions, fill_regions, perturbed_ood


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_regions_have_the_exact_area_and_form_a_few_blobs(fraction: float) -> None:
    regions = blob_regions(4, 64, 48, fraction, seed=3)
    assert regions.shape == (4, 1, 64, 48) and regions.dtype == torch.bool
    assert (regions.sum(dim=(1, 2, 3)) == round(fraction * 64 * 48)).all()
    assert torch.equal(regions, blob_regions(4, 64, 48, fraction, seed=3))
    assert not torch.equal(regions, blob_regions(4, 64, 48, fraction, seed=4))
    for region in regions[:, 0].numpy():
        assert label(region)[1] <= 12, "smooth blobs, not scattered pixels"
    with pytest.raises(ValueError, match="fraction must be in"):
        blob_regions(1, 8, 8, 1.0, seed=0)


def test_fill_takes_the_regions_from_the_replacement() -> None:
    inputs, replacement = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    regions = blob_regions(2, 8, 8, 0.25, seed=0)
    filled = fill_regions(inputs, regions, replacement)
    assert torch.equal(filled.bool(), regions)
    with pytest.raises(ValueError, match="replacement must have the inputs' shape"):
        fill_regions(inputs, regions, torch.ones(1, 1, 8, 8))


def test_verdicts_of_a_fill_that_changes_nothing_are_the_unperturbed_ones() -> None:
    card = ModelCard.load(demo_card_path())
    module = load_runner(card, "torch").torch_module
    statistics = OodStatistics.load(card.auxiliary_path("ood_statistics"))
    detector = OodDetector.for_module(statistics, module, card.trust.ood.layer, card.trust.ood.distance)
    rng = np.random.default_rng(0)
    inputs = torch.from_numpy(rng.normal(0, 0.3, size=(3, 1, 224, 224)).astype(np.float32))
    results = perturbed_ood(detector, module, inputs, {"same": inputs, "constant": torch.full_like(inputs, 4.0)})
    assert [(r.fill, r.fraction) for r in results][:3] == [("none", 0.0), ("same", 0.1), ("constant", 0.1)]
    none = results[0]
    for result in results:
        assert result.images == 3 and 0 <= result.flag_rate <= 1
        if result.fill == "same":  # the same images: the same verdicts
            assert (result.flag_rate, result.distance_p50) == pytest.approx((none.flag_rate, none.distance_p50))
