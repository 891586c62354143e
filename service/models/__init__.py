"""Models shipped inside the package: the demo classifier, its card and weights (package data).

Found with :mod:`importlib.resources`, so the default model is there in a source checkout, in an
installed wheel and in the Docker image alike.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def demo_card_path() -> Path:
    """The demo model's card ``service/models/demo/model.yaml`` (the node's default model)."""
    return _packaged_card("service.models.demo")


def shortcut_card_path() -> Path:
    """The card of the demo model that cheats on purpose, ``service/models/demo_shortcut/model.yaml``."""
    return _packaged_card("service.models.demo_shortcut")


def volume_card_path() -> Path:
    """The demo volume model's card ``service/models/volume_demo/model.yaml`` (``input.kind: volume``)."""
    return _packaged_card("service.models.volume_demo")


def _packaged_card(package: str) -> Path:
    card = Path(str(files(package) / "model.yaml"))
    if not card.is_file():
        raise FileNotFoundError(
            f"the model card is missing at {card}: reinstall pacs-xai (pip install --force-reinstall pacs-xai)"
        )
    return card
