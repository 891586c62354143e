"""``pacs-xai model ...``: work on a model card: write one for a model (init), check one on a sample
(check), calibrate its out-of-distribution statistics (calibrate)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.cli.healthy import add_healthy_options, healthy_settings, print_healthy_report
from service.explain import available_explainers
from service.inference.card import ModelCardError
from service.node.pipeline import OUTPUT_KINDS
from service.synthetic.phantoms import CLASSES, SHORTCUT_TOKEN
from service.tools.calibrate import HELD_OUT_EVERY, STATISTICS_FILE, calibrate_ood
from service.tools.healthy import run as healthy_run
from service.tools.model_check import CheckReport, check_model
from service.tools.model_init import (
    CARD_FILE,
    CardSettings,
    InitReport,
    init_from_monai_bundle,
    init_from_onnx,
    init_from_torch,
    init_from_torchxrayvision,
)
from service.tools.progress import print_progress
from service.trust.ood import DEFAULT_MARGIN, DEFAULT_PERCENTILE, DEFAULT_SHRINKAGE


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    model = commands.add_parser(
        "model",
        help="work on a model card: write one (init), check one (check), calibrate its OOD statistics, "
        "train its healthy-appearance model",
        description="Commands that write, check or update a model card.",
        epilog="examples:\n  pacs-xai model init models/chest --torchxrayvision DenseNet --export-onnx\n"
        "  pacs-xai model check models/chest/model.yaml\n"
        "  pacs-xai model calibrate service/models/demo/model.yaml --phantoms 900\n"
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
    _register_init(sub, formatter)
    _register_check(sub, formatter)
    _register_train_healthy(sub, formatter)


def _register_train_healthy(sub: argparse._SubParsersAction, formatter: Callable) -> None:
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


def _register_init(sub: argparse._SubParsersAction, formatter: Callable) -> None:
    init = sub.add_parser(
        "init",
        formatter_class=formatter,
        help="write a validated model card for an ONNX, torch, MONAI bundle or TorchXRayVision model",
        description="Copy the model's weights into OUT_DIR, write OUT_DIR/model.yaml with the sha256 of every file, "
        "the input size, channels and normalisation, the classes and activation, the CAM target layer (the last "
        "spatial feature block, found with one forward pass) and the default methods; then load the card as the "
        "node does. With --export-onnx an ONNX copy is exported from torch and checked against it on a random and "
        "a phantom input (the max abs difference of the logits is printed). What the source does not say (the "
        "input size of a state dict, class names) is given by the options; the options override the source.",
        epilog="examples:\n"
        "  pacs-xai model init models/chest-xrv --torchxrayvision DenseNet --export-onnx\n"
        "  pacs-xai model init models/cxr --onnx cxr.onnx --classes normal,pneumonia --size 320\n"
        "  pacs-xai model init models/mine --torch mypkg.nets:ChestNet --checkpoint chest.pth \\\n"
        "      --classes normal,nodule,effusion --size 224 --mean 0.5 --std 0.25 --export-onnx\n"
        "  pacs-xai model init models/scripted --torch-script chest.pt --classes a,b --size 224\n"
        "  pacs-xai model init models/bundle --monai-bundle /bundles/chest_xray_classifier --export-onnx",
    )
    init.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder for the card and the weights")
    source = init.add_mutually_exclusive_group(required=True)
    source.add_argument("--onnx", type=Path, metavar="FILE", help="an ONNX model file")
    source.add_argument(
        "--torch", metavar="MODULE:CALLABLE", help="a torch network, e.g. mypkg.nets:ChestNet (with --checkpoint)"
    )
    source.add_argument("--torch-script", type=Path, metavar="FILE", help="a whole TorchScript file (.pt)")
    source.add_argument(
        "--monai-bundle", type=Path, metavar="DIR", help="a MONAI bundle (configs/inference.json, models/model.pt)"
    )
    source.add_argument(
        "--torchxrayvision", metavar="CLASS", help="a TorchXRayVision model class (DenseNet); weights via --checkpoint"
    )
    init.add_argument("--checkpoint", type=Path, metavar="FILE", help="state dict (or TorchScript file) of --torch")
    init.add_argument(
        "--arguments",
        type=json.loads,
        metavar="JSON",
        help='keyword arguments of the --torch callable, e.g. \'{"spatial_dims": 2, "out_channels": 3}\' '
        "(default: num_classes and in_channels)",
    )
    init.add_argument("--name", help="model name (default: the folder's name)")
    init.add_argument("--version", default="1.0.0", help="model version (default 1.0.0)")
    init.add_argument("--description", default="", help="a line about the model")
    init.add_argument("--classes", metavar="LIST", help="comma-separated class names, in output order")
    init.add_argument(
        "--activation", choices=("softmax", "sigmoid"), help="softmax (one class) or sigmoid (multi-label)"
    )
    init.add_argument("--threshold", type=float, metavar="P", help="presence threshold of every class (default 0.5)")
    init.add_argument("--size", type=_size, metavar="ROWSxCOLUMNS", help="network input size, e.g. 224 or 256x320")
    init.add_argument("--channels", type=int, choices=(1, 3), help="input channels")
    init.add_argument("--mean", metavar="LIST", help="normalisation (x - mean) / std of [0, 1] pixels, per channel")
    init.add_argument("--std", metavar="LIST", help="see --mean")
    init.add_argument("--windowing", choices=("dicom", "percentile"), default="dicom", help="pixel windowing policy")
    init.add_argument("--aspect", choices=("letterbox", "stretch"), default="letterbox", help="resizing policy")
    init.add_argument("--target-layer", metavar="NAME", help="CAM target layer (default: found automatically)")
    init.add_argument(
        "--findings",
        metavar="POLICY",
        help="which findings to explain: all_positive, top_k, or a comma-separated list of class names "
        "(default: all_positive for sigmoid, top_k for softmax)",
    )
    init.add_argument("--top-k", type=_positive_int, metavar="K", help="with --findings top_k: how many (default 1)")
    init.add_argument("--methods", metavar="LIST", help=f"default methods (from: {', '.join(available_explainers())})")
    init.add_argument(
        "--outputs", default="sc", metavar="LIST", help=f"default outputs, from: {', '.join(OUTPUT_KINDS)}"
    )
    init.add_argument("--modalities", metavar="LIST", help="applies_to modalities, e.g. CR,DX")
    init.add_argument("--body-parts", metavar="LIST", help="applies_to body parts, e.g. CHEST")
    init.add_argument(
        "--export-onnx", action="store_true", help="also export ONNX weights and check them against torch"
    )
    init.add_argument("--force", action="store_true", help=f"overwrite an existing {CARD_FILE} in OUT_DIR")
    init.set_defaults(handler=_init)


def _register_check(sub: argparse._SubParsersAction, formatter: Callable) -> None:
    check = sub.add_parser(
        "check",
        formatter_class=formatter,
        help="load a model card and run every configured method on a sample",
        description="Load the card with every check the node makes at start-up, then explain a sample (a phantom "
        "chest radiograph unless --sample is given) with each method of the card's defaults (or --method), with the "
        "card's outputs. Prints the device, the predictions (probability, threshold, present, explained), the time "
        "of each method (one pass) and any warning. Exit status 1 when a method fails, 2 for a wrong card.",
        epilog="examples:\n  pacs-xai model check service/models/demo/model.yaml\n"
        "  pacs-xai model check models/chest-xrv --sample chest.dcm --method gradcam --method occlusion",
    )
    check.add_argument("card", type=Path, metavar="CARD", help="the model card (model.yaml or its folder)")
    check.add_argument("--sample", type=Path, metavar="FILE", help="a DICOM image (default: a phantom radiograph)")
    check.add_argument("--method", action="append", dest="methods", metavar="NAME", help="a method; repeat for several")
    check.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    check.set_defaults(handler=_check)


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLUMNS or N, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLUMNS or N with positive sizes, got {text!r}")
    return (values[0], values[-1])


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _numbers(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None


def _init(args: argparse.Namespace) -> int:
    card_path = args.out_dir / CARD_FILE
    if card_path.exists() and not args.force:
        print(f"error: {card_path} exists; give --force to overwrite it", file=sys.stderr)
        return 2
    if args.torch and args.checkpoint is None:
        print("error: --torch needs --checkpoint FILE (its state dict or TorchScript file)", file=sys.stderr)
        return 2
    try:
        findings = args.findings if args.findings in (None, "all_positive", "top_k") else _names(args.findings)
        settings = CardSettings(
            name=args.name,
            version=args.version,
            description=args.description,
            classes=_names(args.classes),
            activation=args.activation,
            threshold=args.threshold,
            rows=args.size[0] if args.size else None,
            columns=args.size[1] if args.size else None,
            channels=args.channels,
            mean=_numbers(args.mean, "--mean"),
            std=_numbers(args.std, "--std"),
            windowing=args.windowing,
            aspect=args.aspect,
            target_layer=args.target_layer,
            findings=findings,
            top_k=args.top_k,
            methods=_names(args.methods),
            outputs=_names(args.outputs) or ("sc",),
            modalities=_names(args.modalities) or (),
            body_parts=_names(args.body_parts) or (),
        )
        common = {"progress": print_progress}
        if args.onnx:
            report = init_from_onnx(args.onnx, args.out_dir, settings, **common)
        elif args.torch or args.torch_script:
            report = init_from_torch(
                args.torch,
                args.checkpoint or args.torch_script,
                args.out_dir,
                settings,
                arguments=args.arguments,
                export_onnx=args.export_onnx,
                **common,
            )
        elif args.monai_bundle:
            report = init_from_monai_bundle(
                args.monai_bundle, args.out_dir, settings, export_onnx=args.export_onnx, **common
            )
        else:
            report = init_from_torchxrayvision(
                args.torchxrayvision,
                args.out_dir,
                settings,
                checkpoint=args.checkpoint,
                export_onnx=args.export_onnx,
                **common,
            )
    except ValueError as exc:  # ModelInitError, ModelCardError: one line naming the value
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_init(report)
    return 0


def _print_init(report: InitReport) -> None:
    card = report.card
    print(f"model card: {report.card_path} (from a {report.source} model, {report.seconds:.1f} s)")
    for runtime, entry in card.weights.items():
        print(f"  weights {runtime}: {entry.file} sha256 {entry.sha256[:16]}...")
    section = card.input
    print(
        f"  input: {section.channels} channel(s), {section.rows}x{section.columns}, {section.aspect}, windowing "
        f"{section.windowing}, mean {list(section.mean)} std {list(section.std)}"
    )
    print(
        f"  output: {card.output.activation} over {len(card.output.classes)} classes: {', '.join(card.output.classes)}"
    )
    print(f"  target layer: {card.target_layer or '(none)'}")
    findings = card.explain.findings
    print(
        f"  explains: {findings if isinstance(findings, str) else ', '.join(findings)}; "
        f"methods {', '.join(card.defaults.methods)}"
    )
    for label, difference in report.export_differences.items():
        print(f"  ONNX export vs torch, {label} input: max abs difference {difference:.3g}")
    for note in report.notes:
        print(f"  note: {note}")


def _check(args: argparse.Namespace) -> int:
    try:
        report = check_model(args.card, sample=args.sample, methods=args.methods, device=args.device)
    except (ModelCardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_check(report)
    return 1 if report.failed else 0


def _print_check(report: CheckReport) -> None:
    print(f"model {report.card_name} {report.card_version}: loaded in {report.load_seconds:.1f} s")
    gradient = report.gradient_device or "none (no torch weights)"
    print(f"device: forward {report.forward_runtime} on {report.forward_device}; gradients on {gradient}")
    print(f"sample: {report.sample}")
    if report.predictions:
        probabilities = report.predictions[0].probabilities
        width = max(len(name) for name in report.classes)
        print(f"  {'class'.ljust(width)}  probability  threshold  present  explained")
        for name, probability, threshold in zip(report.classes, probabilities, report.thresholds):
            present = "yes" if probability >= threshold else "no"
            explained = "yes" if name in report.explained else ""
            print(f"  {name.ljust(width)}  {probability:11.3f}  {threshold:9.3f}  {present:7}  {explained}")
    for method in report.methods:
        if method.error:
            print(f"method {method.method}: FAILED: {method.error}")
        else:
            print(
                f"method {method.method}: {method.milliseconds:.0f} ms, {len(method.outputs)} objects "
                f"({', '.join(method.outputs)})"
            )
    for warning in report.warnings:
        print(f"warning: {warning}")
    if not report.warnings:
        print("warnings: none")


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
