"""The shipped model that cheats on purpose: the proof needs no map. Held out, it is right with the
"PORTABLE" token as in training (nodules only) and wrong when the token moves to the other classes."""

from __future__ import annotations

import numpy as np
import pytest

from service.inference.deployed import DeployedModel
from service.models import demo_card_path, shortcut_card_path
from service.synthetic.phantoms import CLASSES
from service.tools.demo.train import HELD_OUT_SEED_OFFSET, SHORTCUT_CLASS, TrainingSettings, phantom_arrays

PER_CLASS = 20

pytestmark = pytest.mark.slow  # 120 phantoms through two models: a few seconds
HELD_OUT_SEED = TrainingSettings().seed + HELD_OUT_SEED_OFFSET + 1  # not the images its card figures came from


@pytest.fixture(scope="module")
def cheat() -> DeployedModel:
    model = DeployedModel.from_card_path(shortcut_card_path())
    yield model
    model.close()


def _accuracy(model: DeployedModel, token_classes: frozenset[str]) -> float:
    inputs, labels = phantom_arrays(PER_CLASS, HELD_OUT_SEED, token_classes=token_classes)
    predicted = np.array([p.class_index for p in model.predict(inputs)])
    return float((predicted == labels).mean())


def test_right_with_the_token_as_in_training_and_wrong_when_it_moves(cheat: DeployedModel) -> None:
    as_trained = _accuracy(cheat, frozenset({SHORTCUT_CLASS}))
    moved = _accuracy(cheat, frozenset(CLASSES) - {SHORTCUT_CLASS})
    assert as_trained >= 0.95, f"held-out accuracy with the token as in training {as_trained:.0%}"
    assert moved <= 0.40, f"held-out accuracy with the token moved {moved:.0%}: the model does not rely on it"


def test_the_honest_model_ignores_the_token() -> None:
    honest = DeployedModel.from_card_path(demo_card_path())
    try:
        assert _accuracy(honest, frozenset(CLASSES) - {SHORTCUT_CLASS}) >= 0.9
    finally:
        honest.close()
