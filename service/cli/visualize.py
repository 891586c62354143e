"""``pacs-xai visualize-class``: the input the model scores highest for one class, as PNG and DICOM
(the work is :mod:`service.tools.visualize_class`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from service.explain.base import ExplainerError
from service.explain.methods.class_model import OBJECTIVES
from service.inference.card import ModelCard, ModelCardError
from service.models import demo_card_path
from service.tools.visualize_class import StepProgress, visualize_class

EXAMPLES = """examples:
  pacs-xai visualize-class --class nodule
  pacs-xai visualize-class --class effusion --iterations 500 --seed 3 --out class-models/
  pacs-xai visualize-class --class normal --objective log_softmax --model service/models/demo/
"""


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
    try:
        card = ModelCard.load(args.model or demo_card_path())
        result = visualize_class(
            card,
            args.class_name,
            args.out,
            iterations=args.iterations,
            seed=args.seed,
            objective=args.objective,
            progress=_progress_printer(args.iterations),
        )
    except (ModelCardError, ExplainerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: cannot write the outputs to {args.out}: {exc}", file=sys.stderr)
        return 1
    print(result.png)
    print(result.dicom)
    print(
        f"class {args.class_name!r} logit {result.final_logit:.3f} (probability {result.final_probability:.3f}); "
        f"noise start logit {result.start_logit:.3f} (probability {result.start_probability:.3f})"
    )
    return 0


def _progress_printer(iterations: int) -> StepProgress:
    def report(step: int, score: float) -> None:
        print(f"step {step}/{iterations}: target score {score:.3f}", file=sys.stderr, flush=True)

    return report
