"""The built-in demo: phantom chest radiographs, the demo CNN and its training."""

from pathlib import Path


def demo_card_path() -> Path:
    """The demo model's card, shipped in the source tree as ``deploy/models/demo/model.yaml``."""
    return Path(__file__).resolve().parents[2] / "deploy" / "models" / "demo" / "model.yaml"
