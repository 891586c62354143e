"""``pacs-xai evaluate``: the scorecard of every model x method on a labelled set (the work is
:mod:`service.tools.evaluate`)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from service.explain import ExplainerError, available_explainers, get_explainer
from service.inference.card import ModelCard, ModelCardError
from service.models import demo_card_path
from service.node.pipeline import card_settings
from service.tools.bench.explain import parse_param
from service.tools.evaluate.labelled import HELD_OUT_SEED, LabelledSet, folder_set, phantom_set
from service.tools.evaluate.plots import plot_scorecard
from service.tools.evaluate.run import EvaluationSettings, evaluate
from service.tools.evaluate.variants import replacement_comparison, split_variant, variant_settings
from service.tools.progress import Progress, print_progress

#: The methods a governance board sees first (the issue's set): CAM, perturbation, gradient, and a
#: method known to fail the randomisation check.
DEFAULT_METHODS = ("gradcam", "occlusion", "rise", "saliency", "guided_backprop")

EXAMPLES = """examples:
  pacs-xai evaluate                                     # the demo model, 60 phantoms, the five default methods
  pacs-xai evaluate --model service/models/demo_shortcut --token-on nodule --method gradcam --method occlusion
  pacs-xai demo phantoms --out labelled/ --count 60 --annotations
  pacs-xai evaluate --images labelled/ --model CARD --param rise.masks=2000
  pacs-xai evaluate --compare-replacement --randomisation-images 0   # blur vs constant vs healthy fill
  pacs-xai evaluate --method occlusion --method occlusion:healthy --param occlusion:healthy.perturbation=healthy

The scorecard (scorecard.json, scorecard.md, scorecard-<model>.png, maps-<model>.png) goes to --out.
Each figure is tagged with the Co-12 property it measures; scorecard.md ends with every definition.
A method entry NAME:LABEL is a variant of NAME with settings of its own (--param NAME:LABEL.SETTING=VALUE).
"""


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="scorecard: can this model's heatmaps be believed? (localisation, faithfulness, sanity checks)",
        description="Score every model x method on a labelled set: localisation against the ground truth, "
        "faithfulness (deletion, insertion, ROAD), the cascading randomisation sanity check, the random-logit "
        "check, repeatability and cost.",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        type=Path,
        metavar="CARD",
        help="model card YAML or its folder; repeat for several (default: the built-in demo model)",
    )
    parser.add_argument(
        "--method",
        action="append",
        dest="methods",
        metavar="NAME[:LABEL]",
        help=f"explainer, or a variant of one with its own --param settings; repeat for several "
        f"(default: {', '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--compare-replacement",
        action="store_true",
        help="measure what fills a removed region (Uzunova et al. 2019): meaningful perturbation with blur, "
        "constant and healthy replacement, and occlusion, RISE and HiPe with constant and healthy fill "
        "(after any --method); needs the card's auxiliary.healthy_appearance",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--phantoms", type=int, default=60, metavar="N", help="built-in held-out phantoms (default: %(default)s)"
    )
    source.add_argument(
        "--images", type=Path, metavar="DIR", help="a folder of DICOM images with ground-truth DICOM SEG objects"
    )
    parser.add_argument(
        "--token-on",
        action="append",
        default=[],
        metavar="CLASS",
        help="burn the shortcut token (PORTABLE) into this class's phantoms, as the shortcut model was trained",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="SEGMENT=CLASS",
        help="map a SEG's segment label or finding to a model class, e.g. 'Pleural effusion=effusion'",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="METHOD.SETTING=VALUE",
        help="an explainer setting on top of the card's, e.g. rise.masks=2000",
    )
    parser.add_argument("--out", type=Path, default=Path("evaluate-out"), metavar="DIR", help="(default %(default)s)")
    parser.add_argument(
        "--randomisation-images",
        type=int,
        default=EvaluationSettings.randomisation_images,
        metavar="N",
        help="images with a finding in the randomisation checks (default %(default)s)",
    )
    parser.add_argument(
        "--road-images",
        type=int,
        default=EvaluationSettings.road_images,
        metavar="N",
        help="images with a finding in ROAD (default %(default)s)",
    )
    parser.add_argument(
        "--repeatability-images",
        type=int,
        default=EvaluationSettings.repeatability_images,
        metavar="N",
        help="first images of the set in the seed-repeatability and ONNX-vs-torch checks (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random draw (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default auto)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cards = args.models or [demo_card_path()]
    methods = tuple(args.methods or ([] if args.compare_replacement else DEFAULT_METHODS))
    try:
        params: dict[str, dict[str, object]] = {}
        for text in args.param:
            method, setting, value = parse_param(text)
            params.setdefault(method, {})[setting] = value
        if args.compare_replacement:
            compared, params = replacement_comparison(params)
            methods += tuple(entry for entry in compared if entry not in methods)
        for card_path in cards:  # a wrong card, method or setting stops here, before any work
            card = ModelCard.load(card_path)
            for entry in methods:
                method, _ = split_variant(entry)
                get_explainer(method, **{**card_settings(card, method), **variant_settings(entry, params)})
        labelled = _labelled_set(args, cards)
    except (ValueError, ModelCardError, ExplainerError) as exc:
        print(f"pacs-xai evaluate: {exc}", file=sys.stderr)
        print(f"methods: {', '.join(available_explainers())}", file=sys.stderr)
        return 2
    for reason in labelled.skipped:
        print(f"left out: {reason}", file=sys.stderr)
    settings = EvaluationSettings(
        methods=methods,
        method_params=params,
        randomisation_images=args.randomisation_images,
        road_images=args.road_images,
        repeatability_images=args.repeatability_images,
        seed=args.seed,
    )
    try:
        scorecard = evaluate(cards, labelled, settings, _with_elapsed_time(), device=args.device)
    except (ValueError, ModelCardError, ExplainerError) as exc:
        print(f"pacs-xai evaluate: {exc}", file=sys.stderr)
        return 1
    as_json, as_markdown = scorecard.write(args.out)
    pictures = plot_scorecard(scorecard, args.out)
    print(scorecard.markdown())
    print(f"written: {as_json}, {as_markdown}, " + ", ".join(str(p) for p in pictures))
    print(f"evaluation took {scorecard.seconds:.0f} s")
    return 0


def _with_elapsed_time() -> Progress:
    """Progress lines on stderr that start with the minutes and seconds since the run began."""
    started = time.monotonic()

    def report(message: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - started), 60)
        print_progress(f"[{minutes:02d}:{seconds:02d}] {message}")

    return report


def _labelled_set(args: argparse.Namespace, cards: list[Path]) -> LabelledSet:
    if args.images is None:
        return phantom_set(args.phantoms, seed=HELD_OUT_SEED + args.seed, token_classes=args.token_on)
    classes = {name for card in cards for name in ModelCard.load(card).output.classes}
    label_map = {}
    for text in args.label:
        segment, sep, name = text.rpartition("=")
        if not sep or name not in classes:
            raise ValueError(
                f"--label needs SEGMENT=CLASS with CLASS one of {', '.join(sorted(classes))}, got {text!r}"
            )
        label_map[segment] = name
    return folder_set(args.images, sorted(classes), label_map=label_map)
