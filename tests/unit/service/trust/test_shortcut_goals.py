"""The shortcut signal's goals, through the node's pipeline with the shipped models and the card
defaults (share >= 0.55 and concentration >= 1.8), on held-out phantoms (seed 424242):

- the model that cheats (trained with "PORTABLE" burned into every nodule image): at least 90 % of
  its explanations of token-carrying nodules flagged, with Grad-CAM and with occlusion;
- the honest demo model: at most 2 % of 60 phantoms (20 per class, every one with the lead "R"
  marker in its corner) flagged, with Grad-CAM and with occlusion.

Measured when the defaults were chosen (commit message of service/trust/shortcut.py): honest
shares 0.04-0.46, concentrations 0.13-1.48; cheating shares 0.68-0.97, concentrations 2.14-3.07.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.inference.deployed import DeployedModel
from service.models import demo_card_path, shortcut_card_path
from service.node.pipeline import ExplainPipeline, TrustVerdict
from service.synthetic.phantoms import CLASSES, make_phantom
from tests.helpers import HELD_OUT_SEED

pytestmark = pytest.mark.slow

METHODS = ("gradcam", "occlusion")
HONEST_PHANTOMS = 60
TOKEN_NODULES = 20


def _phantom(index: int, label: str, *, token: bool):
    """Held-out phantoms varied like the training images: width, photometric interpretation, CR / DX."""
    return make_phantom(
        index,
        label,
        seed=HELD_OUT_SEED,
        cols=(448, 480, 512)[index % 3],
        photometric=("MONOCHROME2", "MONOCHROME1")[index % 2],
        modality=("CR", "DX")[(index // 2) % 2],
        token=token,
    )


def _verdicts(card_path, phantoms) -> Iterator[tuple[object, list[TrustVerdict]]]:
    model = DeployedModel.from_card_path(card_path)
    try:
        pipeline = ExplainPipeline(model, METHODS, outputs=())
        for phantom in phantoms:
            yield phantom, pipeline.process(phantom.dataset).verdicts
    finally:
        model.close()


def _flag_rates(results: list[tuple[object, list[TrustVerdict]]]) -> dict[str, float]:
    rates = {}
    for method in METHODS:
        flags = [v.shortcut.suspected for _, verdicts in results for v in verdicts if v.method == method]
        assert len(flags) == len(results)
        rates[method] = sum(flags) / len(flags)
    return rates


def test_the_cheating_model_is_flagged_on_token_carrying_nodules() -> None:
    phantoms = [_phantom(index, "nodule", token=True) for index in range(TOKEN_NODULES)]
    results = list(_verdicts(shortcut_card_path(), phantoms))
    rates = _flag_rates(results)
    shares = {m: sorted(round(v.shortcut.share, 2) for _, vs in results for v in vs if v.method == m) for m in METHODS}
    for method in METHODS:
        assert rates[method] >= 0.9, f"{method}: {rates[method]:.0%} flagged; shares {shares[method]}"


def test_the_honest_model_is_rarely_flagged_though_every_phantom_has_a_marker() -> None:
    phantoms = [_phantom(index, CLASSES[index % 3], token=False) for index in range(HONEST_PHANTOMS)]
    results = list(_verdicts(demo_card_path(), phantoms))
    rates = _flag_rates(results)
    for method in METHODS:
        flagged = [
            (phantom.label, round(v.shortcut.share, 2), round(v.shortcut.concentration, 2))
            for phantom, verdicts in results
            for v in verdicts
            if v.method == method and v.shortcut.suspected
        ]
        assert rates[method] <= 0.02, f"{method}: {rates[method]:.1%} of {HONEST_PHANTOMS} flagged: {flagged}"


def test_with_the_token_moved_the_flag_follows_the_decision_that_used_it() -> None:
    """The token burned into effusion images: where the cheating model answers "nodule" (read off
    the token, wrongly) the explanation is flagged; where it still answers "effusion" (read off the
    fluid) it is not. Grad-CAM."""
    model = DeployedModel.from_card_path(shortcut_card_path())
    try:
        pipeline = ExplainPipeline(model, ["gradcam"], outputs=())
        outcomes = []
        for index in range(15):
            result = pipeline.process(_phantom(index, "effusion", token=True).dataset)
            outcomes.append((result.predictions[0].class_name, result.verdicts[0].shortcut.suspected))
    finally:
        model.close()
    fooled = [flag for answer, flag in outcomes if answer == "nodule"]
    right = [flag for answer, flag in outcomes if answer == "effusion"]
    assert fooled and right, f"expected both kinds of answer, got {outcomes}"
    assert all(fooled) and not any(right), outcomes
