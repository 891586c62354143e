"""``pacs-xai model ...``: work on a model card (calibrating its out-of-distribution statistics)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.cli.healthy import add_healthy_options, healthy_settings, print_healthy_report
from service.synthetic.phantoms import CLASSES, SHORTCUT_TOKEN
from service.tools.calibrate import HELD_OUT_EVERY, STATISTICS_FILE, calibrate_ood
from service.tools.healthy import run as healthy_run
from service.tools.progress import print_progress
from service.trust.ood import DEFAULT_MARGIN, DEFAULT_PERCENTILE, DEFAULT_SHRINKAGE


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    model = commands.add_parser(
        "model",
        help="work on a model card: calibrate its out-of-distribution statistics, train its healthy-appearance model",
        description="Commands that read a model card and update it.",
        epilog="examples:\n  pacs-xai model calibrate service/models/demo/model.yaml --phantoms 900\n"
        "  pacs-xai model train-healthy --normals /data/normal-chests/ --card /models/chest/model.yaml",
        formatter_class=formatter,
    )
    sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    calibrate = sub.add_parser(
        "calibrate",
        formatter_class=formatter,
        help="fit the out-of-distribution statistics of a model card",
        description="Read the pooled features (the input of the card's trust.ood.layer, by default the last "
        "nn.Linear) of in-distribution images, fit class means and a shared covariance (Mahalanobis distance, "
        "Lee et al. 2018), set the threshold from held-out in-distribution images "
        f"(percentile x margin), write {STATISTICS_FILE} beside the card and update the card's "
        "auxiliary.ood_statistics entry. With --images DIR, every "
        f"{HELD_OUT_EVERY}th frame is held out for the threshold. Needs a card with torch weights.",
        epilog="examples:\n  pacs-xai model calibrate service/models/demo/model.yaml --phantoms 900\n"
        "  pacs-xai model calibrate service/models/demo_shortcut --phantoms 900 --token-class nodule\n"
        "  pacs-xai model calibrate /models/chest/model.yaml --images /data/in-distribution/",
    )
    calibrate.add_argument("card", type=Path, metavar="CARD", help="the model card (model.yaml or its folder)")
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--phantoms", type=_positive_int, metavar="N", help="fit on N phantom chest radiographs (e.g. 900)"
    )
    source.add_argument(
        "--images", type=Path, metavar="DIR", help="fit on every DICOM image below DIR (in-distribution images)"
    )
    calibrate.add_argument(
        "--token-class",
        choices=CLASSES,
        default=None,
        help=f"with --phantoms: burn the word {SHORTCUT_TOKEN} into this class's phantoms, as the cheating demo "
        "model was trained",
    )
    calibrate.add_argument(
        "--shrinkage",
        type=float,
        default=DEFAULT_SHRINKAGE,
        metavar="A",
        help=f"shrinkage of the shared covariance towards the identity, 0..1 (default {DEFAULT_SHRINKAGE})",
    )
    calibrate.add_argument(
        "--percentile",
        type=float,
        default=DEFAULT_PERCENTILE,
        metavar="P",
        help=f"percentile of the held-out distances that sets the threshold (default {DEFAULT_PERCENTILE})",
    )
    calibrate.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        metavar="M",
        help=f"factor on that percentile, >= 1 (default {DEFAULT_MARGIN})",
    )
    calibrate.set_defaults(handler=_calibrate)

    healthy = sub.add_parser(
        "train-healthy",
        formatter_class=formatter,
        help="train the healthy-appearance VAE of a model card on a site's normal images",
        description="Train the variational autoencoder of healthy-tissue replacement (Uzunova et al. 2019) on the "
        "normal images below DIR (every frame of every DICOM image, through the card's pixel path; every "
        f"{healthy_run.HELD_OUT_EVERY}th frame held out), print progress and the held-out error, write "
        "healthy-appearance.pt and healthy-appearance.onnx beside the card (or into --out), update the card's "
        "auxiliary.healthy_appearance entry, and write the held-out reconstruction figure. Every image must be "
        "normal: a lesion in the training set is one the model learns to reproduce.",
        epilog="example:\n"
        "  pacs-xai model train-healthy --normals /data/normal-chests/ --card /models/chest/model.yaml",
    )
    healthy.add_argument("--normals", type=Path, required=True, metavar="DIR", help="a folder of normal DICOM images")
    healthy.add_argument("--card", type=Path, required=True, metavar="CARD", help="the model card (or its folder)")
    healthy.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="write the model here instead (the card is left alone)"
    )
    add_healthy_options(healthy)
    healthy.set_defaults(handler=_train_healthy)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _calibrate(args: argparse.Namespace) -> int:
    if args.token_class is not None and args.phantoms is None:
        print("error: --token-class goes with --phantoms, not with --images", file=sys.stderr)
        return 2
    try:
        report = calibrate_ood(
            args.card,
            phantoms=args.phantoms,
            images=args.images,
            token_class=args.token_class,
            shrinkage=args.shrinkage,
            percentile=args.percentile,
            margin=args.margin,
            progress=print_progress,
        )
    except ValueError as exc:  # ModelCardError, OodError and wrong settings: one line naming the value
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stats = report.statistics
    fit, held = report.fit_distances, report.held_out_distances
    print(f"feature layer: {stats.layer!r} ({stats.dimension} features, {stats.means.shape[0]} class means)")
    print(f"fitted on {stats.fitted_images} images: distance median {np.median(fit):.2f}, max {fit.max():.2f}")
    print(
        f"held out {stats.held_out_images} images: distance median {np.median(held):.2f}, "
        f"{stats.percentile:g}th percentile {np.percentile(held, stats.percentile):.2f}, max {held.max():.2f}"
    )
    print(
        f"threshold: {stats.threshold:.2f} (percentile x {stats.margin:g}); held-out images above it: "
        f"{report.held_out_flagged:.1%}"
    )
    print(f"statistics: {report.path}")
    print(f"model card: {report.card} (auxiliary.ood_statistics updated)")
    print(f"calibration took {report.seconds:.0f} s")
    return 0


def _train_healthy(args: argparse.Namespace) -> int:
    try:
        report = healthy_run.train_on_folder(
            args.card, args.normals, args.figure, healthy_settings(args), print_progress, out_dir=args.out
        )
    except ValueError as exc:  # ModelCardError, wrong settings, too few images: one line naming the value
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_healthy_report(report, args.figure)
    return 0
