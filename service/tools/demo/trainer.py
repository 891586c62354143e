"""The training recipe the demo models share (``pacs-xai demo train`` and ``demo train-volume``).

Seeded: torch's global generator draws the network's initial weights, a generator of its own the
batch order and the flips, so the same settings give the same weights. AdamW with a learning-rate
schedule stepped per batch; shuffled batches, each image flipped left-right with probability 1/2
(lesions occur in either lung); the held-out accuracy after every epoch on the progress line. What
differs between the models comes in: the network, each epoch's training data, the loss and the
schedule. The weights and the card are written by :func:`save_weights` and :func:`write_card`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from torch import nn

from service.inference.card import sha256_of
from service.tools.progress import Progress

#: Epoch number -> that epoch's normalised training inputs ``[N, 1, ...]`` and labels ``[N]``.
TrainingData = Callable[[int], tuple[np.ndarray, np.ndarray]]
#: (model, inputs, labels) -> the loss of one batch.
Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
#: (optimiser, total steps) -> the learning-rate schedule, stepped once per batch.
Schedule = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


class Recipe(Protocol):
    """The settings every demo training has (its settings dataclass has more)."""

    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def threads(self) -> int: ...


@dataclass(frozen=True)
class TrainingReport:
    held_out_accuracy: float
    per_class_accuracy: dict[str, float]
    seconds: float
    files: dict[str, Path]
    #: Shortcut models only: held-out accuracy with the token moved to the other classes.
    token_moved_accuracy: float | None = None


def cross_entropy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain classification loss."""
    return nn.functional.cross_entropy(model(inputs), labels)


def fit(
    network: Callable[[], nn.Module],
    training_data: TrainingData,
    samples_per_epoch: int,
    held_out: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
    recipe: Recipe,
    *,
    schedule: Schedule,
    loss: Loss = cross_entropy,
    evaluation_batch: int = 64,
    started: float | None = None,
    progress: Progress = print,
) -> tuple[nn.Module, float, dict[str, float]]:
    """Seed, build ``network()``, train it ``recipe.epochs`` epochs; the model (in eval mode) with
    its held-out overall and per-class accuracy. ``training_data`` is asked once per epoch for its
    ``samples_per_epoch`` images (the same arrays every time, or fresh ones); ``started``
    (``time.perf_counter()``) dates the progress lines."""
    started = time.perf_counter() if started is None else started
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    model = network()
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=1e-4)
    steps = recipe.epochs * int(np.ceil(samples_per_epoch / recipe.batch_size))
    scheduler = schedule(optimiser, steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    test_x, test_y = held_out
    for epoch in range(recipe.epochs):
        train_x, train_y = training_data(epoch)
        x_all, y_all = torch.from_numpy(train_x), torch.from_numpy(train_y)
        model.train()
        order = torch.randperm(len(x_all), generator=generator)
        total = 0.0
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            xb = x_all[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5  # lesions occur in either lung
            xb = torch.where(flip.view(-1, *[1] * (xb.dim() - 1)), xb.flip(-1), xb)
            optimiser.zero_grad()
            batch_loss = loss(model, xb, y_all[idx])
            batch_loss.backward()
            optimiser.step()
            scheduler.step()
            total += batch_loss.item() * len(idx)
        accuracy = evaluate(model, test_x, test_y, classes, evaluation_batch)[0]
        progress(
            f"epoch {epoch + 1}/{recipe.epochs}: loss {total / len(x_all):.4f}, "
            f"held-out accuracy {accuracy:.1%} ({time.perf_counter() - started:.0f} s)"
        )
    accuracy, per_class = evaluate(model, test_x, test_y, classes, evaluation_batch)
    return model.eval(), accuracy, per_class


def evaluate(
    model: nn.Module, inputs: np.ndarray, labels: np.ndarray, classes: Sequence[str], batch: int = 64
) -> tuple[float, dict[str, float]]:
    """Overall and per-class accuracy of ``model`` on normalised inputs, ``batch`` at a time."""
    model.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [model(torch.from_numpy(inputs[i : i + batch])).argmax(1) for i in range(0, len(inputs), batch)]
        )
    hits = predicted.numpy() == labels
    return float(hits.mean()), {name: float(hits[labels == k].mean()) for k, name in enumerate(classes)}


def save_weights(model: nn.Module, path: Path) -> dict[str, str]:
    """Write the state dict to ``path``; its card entry for the ``torch`` runtime (file, sha256 and
    the eager architecture as ``module:Class``)."""
    torch.save(model.state_dict(), path)
    network = type(model)
    return {"file": path.name, "sha256": sha256_of(path), "architecture": f"{network.__module__}:{network.__name__}"}


def write_card(out_dir: Path, card: dict[str, Any]) -> Path:
    """Write ``card`` as ``out_dir/model.yaml`` (keys in the given order)."""
    card_path = out_dir / "model.yaml"
    card_path.write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
    return card_path
