"""The demo models' shared training recipe: seeded (the same settings give the same weights, another
seed others), each image seen as it is or flipped left-right and nothing else, 2D and 3D inputs
alike, a network that learns a separable task, and the card's weights entry naming the file, its
sha256 and an architecture that imports back to the network."""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from service.tools.demo.trainer import evaluate, fit, save_weights, write_card

CLASSES = ("dark", "bright")


@dataclass(frozen=True)
class Recipe:
    epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 1e-2
    seed: int = 5
    threads: int = 1


class Tiny(nn.Module):
    """One conv, global average pooling, a linear head; ``dimensions`` 2 or 3."""

    def __init__(self, dimensions: int = 2) -> None:
        super().__init__()
        self.conv = (nn.Conv2d if dimensions == 2 else nn.Conv3d)(1, 4, 3, padding=1)
        self.head = nn.Linear(4, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(2).mean(-1))


def brightness_task(count: int, seed: int, shape: tuple[int, ...] = (8, 8)) -> tuple[np.ndarray, np.ndarray]:
    """Noise images, class 1 brighter: a task a left-right flip does not change."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    inputs = rng.normal(0, 0.3, (count, 1, *shape)) + np.where(labels, 1.0, -1.0).reshape(-1, 1, *[1] * len(shape))
    return inputs.astype(np.float32), labels.astype(np.int64)


def run(recipe: Recipe, dimensions: int = 2, **kwargs) -> nn.Module:
    shape = (8, 8) if dimensions == 2 else (4, 6, 6)
    data = brightness_task(16, 0, shape)
    model, _, _ = fit(
        partial(Tiny, dimensions),
        lambda _epoch: data,
        len(data[1]),
        brightness_task(8, 1, shape),
        CLASSES,
        recipe,
        schedule=lambda optimiser, steps: torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps),
        progress=lambda line: None,
        **kwargs,
    )
    return model


@pytest.mark.parametrize("dimensions", [2, 3])
def test_the_same_settings_give_the_same_weights_and_another_seed_others(dimensions: int) -> None:
    first, again, other = run(Recipe(), dimensions), run(Recipe(), dimensions), run(Recipe(seed=6), dimensions)
    state, same, different = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[name], same[name]) for name in state)
    assert not all(torch.equal(state[name], different[name]) for name in state)


def test_every_image_is_seen_as_it_is_or_flipped_left_right_and_nothing_else() -> None:
    seen: list[torch.Tensor] = []

    def loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.extend(inputs.clone())
        return nn.functional.cross_entropy(model(inputs), labels)

    inputs, _ = brightness_task(16, 0)
    run(Recipe(epochs=4), loss=loss)
    originals = [torch.from_numpy(x) for x in inputs]
    plain = [any(torch.equal(x, o) for o in originals) for x in seen]
    flipped = [any(torch.equal(x, o.flip(-1)) for o in originals) for x in seen]
    assert len(seen) == 4 * len(inputs)
    assert all(p or f for p, f in zip(plain, flipped, strict=True))
    assert 0.25 < sum(flipped) / len(seen) < 0.75, "each image is flipped with probability 1/2"


def test_a_separable_task_is_learnt_and_the_accuracy_is_counted_per_class() -> None:
    model = run(Recipe(epochs=6))
    inputs, labels = brightness_task(40, 9)
    overall, per_class = evaluate(model, inputs, labels, CLASSES, batch=7)
    assert overall == 1.0 and per_class == {"dark": 1.0, "bright": 1.0}
    # the labels of the second half swapped: half right overall and in each class
    swapped = np.concatenate([labels[:20], 1 - labels[20:]])
    assert evaluate(model, inputs, swapped, CLASSES) == (0.5, {"dark": 0.5, "bright": 0.5})


def test_the_weights_entry_names_the_file_its_sha256_and_an_architecture_that_imports(tmp_path: Path) -> None:
    model = Tiny()
    entry = save_weights(model, tmp_path / "tiny.pth")
    assert entry["file"] == "tiny.pth"
    assert entry["sha256"] == hashlib.sha256((tmp_path / "tiny.pth").read_bytes()).hexdigest()
    module, name = entry["architecture"].split(":")
    assert getattr(importlib.import_module(module), name) is Tiny
    loaded = torch.load(tmp_path / "tiny.pth")
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    card = {"name": "tiny", "weights": {"torch": entry}, "applies_to": {"modalities": ["CT"]}}
    path = write_card(tmp_path, card)
    assert path == tmp_path / "model.yaml"
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == card
    assert list(yaml.safe_load(path.read_text(encoding="utf-8"))) == ["name", "weights", "applies_to"]
