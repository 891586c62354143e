"""``pacs-xai visualize-class``: the input the model scores highest for one class, as PNG and DICOM.

Class model visualisation (:mod:`service.explain.methods.class_model`) on a model card's torch or
TorchScript weights, at the card's input size, clamped to the model inputs a real image can
produce (the card's normalisation of pixel values 0..1). Writes ``class-<name>.png`` (8-bit
grayscale, contrast-stretched, channels side by side) and ``class-<name>.dcm`` (a standalone
Secondary Capture) and compares the class logit of the result with that of the starting noise.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dicom_io.writers.class_model import build_class_model_capture, grayscale_tiles, save_grayscale_png
from service.explain.base import ExplainerError
from service.explain.methods.class_model import OBJECTIVES, ClassModelVisualisation, class_logits
from service.inference.backends import load_runner
from service.inference.card import ModelCard, ModelCardError, Runtime

EXAMPLES = """examples:
  pacs-xai visualize-class --class nodule
  pacs-xai visualize-class --class effusion --iterations 500 --seed 3 --out class-models/
  pacs-xai visualize-class --class normal --objective log_softmax --model service/models/demo/
"""

#: Runtimes that can back-propagate to the input, in order of preference.
_GRADIENT_RUNTIMES: tuple[Runtime, ...] = ("torch", "torchscript")


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    parser = commands.add_parser(
        "visualize-class",
        help="class model visualisation: the input the model scores highest for a class",
        description="Optimise an input to maximise one class's score (Simonyan et al. 2014, with jitter, blur "
        "and L2 regularisers) and write it as a PNG and a DICOM Secondary Capture.",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    parser.add_argument(
        "--class", dest="class_name", required=True, metavar="NAME", help="class name as listed in the model card"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="CARD",
        help="model card YAML or its folder, with torch or TorchScript weights (default: the built-in demo model)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("visualize-out"), metavar="DIR", help="output folder (default: %(default)s)"
    )
    parser.add_argument("--iterations", type=int, default=200, metavar="N", help="ascent steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the start noise and jitter")
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="logit",
        help="maximise the class logit (the paper's) or its log-softmax probability (default: %(default)s)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from service.models import demo_card_path

    try:
        card = ModelCard.load(args.model or demo_card_path())
        target = class_index(card, args.class_name)
        module = torch_module_for(card)
        visualiser = ClassModelVisualisation(
            iterations=args.iterations,
            seed=args.seed,
            objective=args.objective,
            value_range=input_value_range(card),
            progress_every=max(1, args.iterations // 10),
        )
        shape = (card.input.channels, card.input.rows, card.input.columns)
        image = visualiser.generate(module, target, shape, progress=_progress_printer(args.iterations))
        start = class_logits(module, visualiser.start_image(shape))
        final = class_logits(module, image)
    except (ModelCardError, ExplainerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        png, dcm = write_outputs(card, args.class_name, image.cpu().numpy(), visualiser.settings_text(), args.out)
    except (OSError, ValueError) as exc:
        print(f"error: cannot write the outputs to {args.out}: {exc}", file=sys.stderr)
        return 1
    print(png)
    print(dcm)
    print(
        f"class {args.class_name!r} logit {final[target]:.3f} (probability {_probability(card, final, target):.3f}); "
        f"noise start logit {start[target]:.3f} (probability {_probability(card, start, target):.3f})"
    )
    return 0


def class_index(card: ModelCard, name: str) -> int:
    """Index of class ``name`` in the card; an error listing the valid names otherwise."""
    classes = card.output.classes
    if name not in classes:
        raise ModelCardError(f"unknown class {name!r} for model {card.name}; valid names: {', '.join(classes)}")
    return classes.index(name)


def torch_module_for(card: ModelCard) -> torch.nn.Module:
    """The card's differentiable module (eager torch, else TorchScript); a clear error for ONNX-only cards."""
    runtime = next((r for r in _GRADIENT_RUNTIMES if r in card.weights), None)
    if runtime is None:
        raise ModelCardError(
            f"model card {card.name} has only {', '.join(sorted(card.weights))} weights; visualize-class "
            "back-propagates to the input and needs a torch or torchscript runtime in the card's weights"
        )
    module = load_runner(card, runtime).torch_module
    if module is None:  # the runners of both runtimes expose their module; guard the contract
        raise ModelCardError(f"model card {card.name}: the {runtime} runner exposes no torch module")
    return module


def input_value_range(card: ModelCard) -> tuple[float, float]:
    """The model inputs pixel values 0..1 become under the card's (x - mean) / std, over all channels."""
    channels = card.input.channels
    means = card.input.mean * channels if len(card.input.mean) == 1 else card.input.mean
    stds = card.input.std * channels if len(card.input.std) == 1 else card.input.std
    low = min((0.0 - m) / s for m, s in zip(means, stds))
    high = max((1.0 - m) / s for m, s in zip(means, stds))
    return low, high


def output_stem(class_name: str) -> str:
    """``class-<name>`` with characters unsafe in file names replaced by ``_``."""
    return "class-" + re.sub(r"[^A-Za-z0-9._-]+", "_", class_name)


def write_outputs(
    card: ModelCard, class_name: str, image: np.ndarray, generation: str, out_dir: Path
) -> tuple[Path, Path]:
    """Write ``<out_dir>/class-<name>.png`` and ``.dcm`` for the ``[C, H, W]`` numpy ``image``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = grayscale_tiles(image)
    png = out_dir / f"{output_stem(class_name)}.png"
    dcm = png.with_suffix(".dcm")
    save_grayscale_png(pixels, png)
    sc = build_class_model_capture(
        pixels, class_name=class_name, model_name=card.name, model_version=card.version, generation=generation
    )
    sc.save_as(dcm, enforce_file_format=True)
    return png, dcm


def _probability(card: ModelCard, logits: torch.Tensor, target: int) -> float:
    """The card's activation (softmax or sigmoid) of ``logits`` at ``target``."""
    if card.output.activation == "softmax":
        return float(torch.softmax(logits, dim=0)[target])
    return float(torch.sigmoid(logits[target]))


def _progress_printer(iterations: int) -> Callable[[int, float], None]:
    def report(step: int, score: float) -> None:
        print(f"step {step}/{iterations}: target score {score:.3f}", file=sys.stderr, flush=True)

    return report
