"""Start-up warm-up: the pipeline's dry run initialises what the first study would otherwise pay for."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.inference.deployed import DeployedModel
from service.models import demo_card_path
from service.node.app import Node
from service.node.config import load_config
from service.node.pipeline import ExplainPipeline
from service.synthetic.phantoms import make_phantom
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture()
def deployed() -> Iterator[DeployedModel]:
    model = DeployedModel.from_card_path(demo_card_path())
    yield model
    model.close()


def test_warm_up_runs_every_method_and_output_and_keeps_nothing(deployed: DeployedModel) -> None:
    assert "gradient_runner" not in deployed.__dict__  # loaded lazily
    pipeline = ExplainPipeline(deployed, ["gradcam", "occlusion"], ["sc", "pm", "sr"])
    # ... here by the OOD signal: the card's statistics are checked against the eager module at start.
    assert "gradient_runner" in deployed.__dict__
    assert pipeline.warm_up() > 0
    # The pipeline is stateless: a study after the warm-up gets exactly its own outputs.
    result = pipeline.process(make_phantom(1, "nodule", modality="DX").dataset)
    assert sorted((o.method, o.kind) for o in result.outputs) == [
        ("gradcam", "pm"),
        ("gradcam", "sc"),
        ("gradcam", "sr"),
        ("occlusion", "pm"),
        ("occlusion", "sc"),
        ("occlusion", "sr"),
    ]


@pytest.mark.parametrize("enabled", [True, False])
def test_node_warms_up_in_the_background_when_configured(
    enabled: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(
        None,
        {
            "listener": {"port": 0},
            "storage": {"data_dir": str(tmp_path)},
            "metrics": {"enabled": False},
            "model": {"warm_up": enabled},
        },
    )
    node = Node(config)
    with caplog.at_level(logging.INFO, logger="service.node.app"):
        node.start()
        try:
            assert node.warmed_up.wait(60)
            if enabled:
                wait_for(lambda: "warm-up done" in caplog.text, 10, "the warm-up log line")
                assert "gradient_runner" in node.model.__dict__
            else:
                assert not any(t.name == "pacs-xai-warm-up" for t in node._threads)
        finally:
            node.stop()
