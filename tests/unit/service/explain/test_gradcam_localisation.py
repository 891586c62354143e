"""Grad-CAM on the shipped demo model finds the phantom nodules (pointing game on held-out data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_io.pixels import prepare_frames
from service.explain import get_explainer
from service.inference.deployed import DeployedModel
from service.models import demo_card_path
from tests.helpers import held_out_nodules

#: Training used seeds 7 and 1007; these phantoms were never seen.
NODULES = 50


@pytest.mark.slow
def test_gradcam_peak_inside_the_nodule_for_at_least_80_percent() -> None:
    model = DeployedModel.from_card_path(demo_card_path())
    card = model.card
    nodule = card.output.classes.index("nodule")
    explainer = get_explainer("gradcam", target_layer=card.target_layer)
    phantoms = held_out_nodules(NODULES)
    frames = [prepare_frames(p.dataset, card.input.spec())[0] for p in phantoms]
    batch = model.normalise(np.stack([frame.model_input for frame in frames]))
    maps = explainer.explain(
        model.model_for(needs_gradients=explainer.needs_gradients), torch.from_numpy(batch), [nodule] * NODULES
    ).numpy()
    hits = 0
    for phantom, frame, cam in zip(phantoms, frames, maps):
        source_map = frame.mapping.to_source_grid(cam)
        assert source_map.shape == phantom.lesion_mask.shape
        peak = np.unravel_index(np.argmax(source_map), source_map.shape)
        hits += bool(phantom.lesion_mask[peak])
    rate = hits / NODULES
    print(f"Grad-CAM pointing game on {NODULES} held-out nodules: {rate:.0%}")
    assert rate >= 0.8, f"Grad-CAM peak inside the nodule for only {rate:.0%} of {NODULES} held-out phantoms"
