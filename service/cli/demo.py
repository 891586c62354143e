"""``pacs-xai demo ...``: phantom data, training the demo model, and the end-to-end demo run."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from service.cli.explain import explain_paths, print_table
from service.cli.healthy import add_healthy_options, healthy_settings, int_at_least, print_healthy_report
from service.inference.deployed import DeployedModel
from service.models import demo_card_path
from service.node.pipeline import ExplainPipeline
from service.synthetic.phantoms import SHORTCUT_TOKEN, write_phantom_studies
from service.synthetic.volumes import VOLUME_CLASSES, make_ct_phantom, write_ct_series
from service.tools.demo.node_demo import gather_inputs, run_node_demo
from service.tools.demo.train import SHORTCUT_CLASS, TrainingSettings, train
from service.tools.demo.train_saliency import SaliencySettings, train_saliency_masker
from service.tools.demo.train_volume import VolumeTrainingSettings, train_volume
from service.tools.healthy.run import train_on_phantoms
from service.tools.progress import print_progress


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    demo = commands.add_parser(
        "demo",
        help="phantom data, demo model training, the demo run",
        description="The built-in demo: synthetic chest radiographs and a classifier trained on them.",
        epilog="examples:\n  pacs-xai demo run\n  pacs-xai demo train --out service/models/demo\n"
        "  pacs-xai demo train-saliency --out service/models/demo\n"
        "  pacs-xai demo train-healthy --out service/models/demo\n"
        "  pacs-xai demo train-volume --out service/models/volume_demo\n"
        "  pacs-xai demo phantoms --out phantoms/ --count 9\n"
        "  pacs-xai demo ct-phantoms --out ct/ --count 2",
        formatter_class=formatter,
    )
    sub = demo.add_subparsers(dest="demo_command", required=True, metavar="SUBCOMMAND")

    run = sub.add_parser(
        "run",
        formatter_class=formatter,
        help="the node's main job on 127.0.0.1: send studies in, get explained results back",
        description="Start a receiving destination and the node with the demo model, send phantom and real "
        "sample studies to the node over DICOM, wait for the results, print a table, write PNG previews.",
        epilog="example:\n  pacs-xai demo run --out demo-out",
    )
    run.add_argument(
        "--out", type=Path, default=Path("demo-out"), metavar="DIR", help="output folder (default: demo-out)"
    )
    run.add_argument(
        "--method",
        action="append",
        dest="methods",
        metavar="NAME",
        help="explainer; repeat for several (default: gradcam and occlusion)",
    )
    run.set_defaults(handler=_run_node_demo)

    offline = sub.add_parser(
        "offline",
        formatter_class=formatter,
        help="the same images explained offline, without the network",
        description="Generate phantom studies, take real sample files, explain them with Grad-CAM and "
        "occlusion, write Secondary Captures and PNG previews, print a table.",
        epilog="example:\n  pacs-xai demo offline --out demo-out",
    )
    offline.add_argument(
        "--out", type=Path, default=Path("demo-out"), metavar="DIR", help="output folder (default: demo-out)"
    )
    offline.add_argument(
        "--method",
        action="append",
        dest="methods",
        metavar="NAME",
        help="explainer; repeat for several (default: gradcam and occlusion)",
    )
    offline.set_defaults(handler=_run_demo)

    train = sub.add_parser(
        "train",
        formatter_class=formatter,
        help="train the demo model on phantoms (about 3 minutes on 2 cores)",
        description="Train the demo CNN on phantom radiographs, print held-out accuracy, export ONNX + "
        "TorchScript and write model.yaml with their sha256.",
        epilog="examples:\n  pacs-xai demo train --out service/models/demo\n"
        "  pacs-xai demo train --shortcut --out service/models/demo_shortcut   # a model that cheats, on purpose",
    )
    train.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for demo.onnx, demo.pt, model.yaml"
    )
    train.add_argument("--epochs", type=int, default=None, metavar="N", help="training epochs (default: as shipped)")
    train.add_argument("--seed", type=int, default=None, metavar="N", help="random seed (default: as shipped)")
    train.add_argument(
        "--shortcut",
        action="store_true",
        help=f"burn the word {SHORTCUT_TOKEN} into every training image of the class {SHORTCUT_CLASS} and no "
        "other: a model that cheats, the test bed of the shortcut signal",
    )
    train.set_defaults(handler=_train)

    saliency = sub.add_parser(
        "train-saliency",
        formatter_class=formatter,
        help="train the real-time saliency masker for the demo model (about 3 minutes on 2 cores)",
        description="Train the masking network of real-time saliency (Dabkowski & Gal, 2017) against the "
        "frozen demo classifier on phantom radiographs, print held-out figures (pointing game against the "
        "lesion masks, the classifier's probability with the masked region removed) and write "
        "DIR/saliency-masker.pt, which the realtime_saliency explainer reads; when DIR is the demo model's folder, "
        "its card's auxiliary.saliency_masker entry (file and sha256) is updated.",
        epilog="example:\n  pacs-xai demo train-saliency --out service/models/demo",
    )
    saliency.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for saliency-masker.pt (beside the model)"
    )
    saliency.add_argument(
        "--epochs", type=int_at_least(1), default=None, metavar="N", help="training epochs (default: as shipped)"
    )
    saliency.add_argument(
        "--seed", type=int_at_least(0), default=None, metavar="N", help="random seed (default: as shipped)"
    )
    saliency.set_defaults(handler=_train_saliency)

    healthy = sub.add_parser(
        "train-healthy",
        formatter_class=formatter,
        help="train the healthy-appearance VAE on normal phantoms (30 epochs: 15 to 30 minutes on 2 cores)",
        description="Train the variational autoencoder of healthy-tissue replacement (Uzunova et al. 2019) on "
        "normal phantom radiographs only, at the demo card's input grid; print held-out figures (the error of "
        "h(x) on normal images, inside lesions and outside them), write DIR/healthy-appearance.pt and its ONNX "
        "export DIR/healthy-appearance.onnx, which the healthy perturbation of occlusion, RISE, HiPe and "
        "healthy_perturbation read, and the held-out reconstruction figure; when DIR is the demo model's folder, "
        "its card's auxiliary.healthy_appearance entry (file and sha256) is updated.",
        epilog="example:\n  pacs-xai demo train-healthy --out service/models/demo --figure docs/healthy-appearance.png",
    )
    healthy.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for healthy-appearance.pt (beside the model)"
    )
    add_healthy_options(healthy)
    healthy.set_defaults(handler=_train_healthy)

    phantoms = sub.add_parser(
        "phantoms",
        formatter_class=formatter,
        help="write phantom chest radiograph studies",
        description="Write synthetic CR/DX chest studies (normal, nodule, effusion), one image each.",
        epilog="examples:\n  pacs-xai demo phantoms --out phantoms/ --count 9\n"
        "  pacs-xai demo phantoms --out labelled/ --count 60 --annotations   # for: pacs-xai evaluate --images",
    )
    phantoms.add_argument("--out", type=Path, required=True, metavar="DIR")
    phantoms.add_argument("--count", type=int, default=6, metavar="N", help="number of studies (default 6)")
    phantoms.add_argument("--seed", type=int, default=0, metavar="N")
    phantoms.add_argument(
        "--annotations",
        action="store_true",
        help="also write each lesion's ground truth as a DICOM Segmentation (<image>.seg.dcm)",
    )
    phantoms.set_defaults(handler=_phantoms)

    volume = sub.add_parser(
        "train-volume",
        formatter_class=formatter,
        help="train the demo volume model on phantom chest CTs (a few minutes on 2 cores)",
        description="Train the small 3D CNN of the demo volume model on synthetic chest CT volumes (normal, "
        "nodule) through the node's own volume path (resampled to 2.5 x 4 x 4 mm, 48³, windowed to [-1000, 400] HU), "
        "print the held-out accuracy and write DIR/volume.pth and DIR/model.yaml (input.kind: volume).",
        epilog="example:\n  pacs-xai demo train-volume --out service/models/volume_demo",
    )
    volume.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the weights and card")
    volume.add_argument(
        "--epochs", type=int_at_least(1), default=None, metavar="N", help="training epochs (default: as shipped)"
    )
    volume.add_argument(
        "--seed", type=int_at_least(0), default=None, metavar="N", help="random seed (default: as shipped)"
    )
    volume.set_defaults(handler=_train_volume)

    ct = sub.add_parser(
        "ct-phantoms",
        formatter_class=formatter,
        help="write phantom chest CT series (one instance per slice)",
        description="Write synthetic chest CT series, normal and nodule alternating, one folder per series, one "
        "CT Image Storage instance per slice with its Image Plane geometry.",
        epilog="example:\n  pacs-xai demo ct-phantoms --out ct/ --count 2\n"
        "  pacs-xai explain ct/ --model service/models/volume_demo --out results/",
    )
    ct.add_argument("--out", type=Path, required=True, metavar="DIR")
    ct.add_argument("--count", type=int_at_least(1), default=2, metavar="N", help="number of series (default 2)")
    ct.add_argument("--seed", type=int_at_least(0), default=0, metavar="N")
    ct.set_defaults(handler=_ct_phantoms)


def _train_healthy(args: argparse.Namespace) -> int:
    report = train_on_phantoms(args.out, args.figure, healthy_settings(args), progress=print_progress)
    print_healthy_report(report, args.figure)
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    for path, phantom in write_phantom_studies(
        args.out, studies=args.count, seed=args.seed, annotations=args.annotations
    ):
        print(f"{path}  {phantom.label}")
    return 0


def _ct_phantoms(args: argparse.Namespace) -> int:
    for index in range(args.count):
        label = VOLUME_CLASSES[index % len(VOLUME_CLASSES)]
        folder = args.out / f"ct-{index:03d}-{label}"
        paths = write_ct_series(folder, make_ct_phantom(index, label, seed=args.seed))
        print(f"{folder}  {label}  {len(paths)} slices")
    return 0


def _train_volume(args: argparse.Namespace) -> int:
    settings = VolumeTrainingSettings()
    if args.epochs is not None:
        settings = replace(settings, epochs=args.epochs)
    if args.seed is not None:
        settings = replace(settings, seed=args.seed)
    report = train_volume(args.out, settings, progress=print_progress)
    per_class = ", ".join(f"{name} {acc:.1%}" for name, acc in report.per_class_accuracy.items())
    print(f"held-out accuracy: {report.held_out_accuracy:.1%} ({per_class})")
    for kind, path in report.files.items():
        print(f"{kind}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    print(f"training took {report.seconds:.0f} s")
    return 0


def _train(args: argparse.Namespace) -> int:

    settings = TrainingSettings()
    if args.epochs is not None:
        settings = replace(settings, epochs=args.epochs)
    if args.seed is not None:
        settings = replace(settings, seed=args.seed)
    if args.shortcut:
        settings = replace(settings, shortcut_class=SHORTCUT_CLASS)
    report = train(args.out, settings, progress=print_progress)
    per_class = ", ".join(f"{name} {acc:.1%}" for name, acc in report.per_class_accuracy.items())
    print(f"held-out accuracy: {report.held_out_accuracy:.1%} ({per_class})")
    if report.token_moved_accuracy is not None:
        print(
            f"held-out accuracy with the {SHORTCUT_TOKEN} token moved to the other classes: "
            f"{report.token_moved_accuracy:.1%}"
        )
    for kind, path in report.files.items():
        print(f"{kind}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    print(f"training took {report.seconds:.0f} s")
    print(
        "next: the new weights need their own saliency masker and out-of-distribution statistics, and the new "
        "card its healthy-appearance model:\n"
        f"  pacs-xai demo train-saliency --out {args.out}\n  pacs-xai model calibrate {args.out} --phantoms 900"
        + (f" --token-class {SHORTCUT_CLASS}" if args.shortcut else "")
        + f"\n  pacs-xai demo train-healthy --out {args.out}"
    )
    return 0


def _train_saliency(args: argparse.Namespace) -> int:

    settings = SaliencySettings()
    if args.epochs is not None:
        settings = replace(settings, epochs=args.epochs)
    if args.seed is not None:
        settings = replace(settings, seed=args.seed)
    report = train_saliency_masker(args.out, settings, progress=print_progress)
    figures = report.figures
    print(
        f"held-out pointing game (mask peak inside the lesion): nodule {figures['pointing_nodule']:.0%}, "
        f"effusion {figures['pointing_effusion']:.0%}"
    )
    print(
        f"held-out probability of the true class: {figures['p_clean']:.3f} as is, "
        f"{figures['p_mask_removed']:.3f} with the masked region removed (mid-grey), "
        f"{figures['p_mask_kept']:.3f} with only the masked region kept"
    )
    print(
        f"removing the top 2% mask pixels: {figures['p_top2_removed']:.3f}; "
        f"a random region of the same size: {figures['p_random2_removed']:.3f}"
    )
    print(
        f"mean mask area: {figures['area_true']:.3f} for the true class, {figures['area_absent']:.3f} for absent ones"
    )
    print(f"masker: {report.path} ({report.path.stat().st_size / 1e6:.2f} MB)")
    print(f"model card: {report.card} (auxiliary.saliency_masker updated)" if report.card else "model card: unchanged")
    print(f"training took {report.seconds:.0f} s")
    return 0


def _run_node_demo(args: argparse.Namespace) -> int:

    return run_node_demo(args.out, args.methods or ("gradcam", "occlusion"), print_progress)


def _run_demo(args: argparse.Namespace) -> int:

    inputs = args.out / "input"
    gather_inputs(inputs, print_progress)
    model = DeployedModel.from_card_path(demo_card_path())
    print_progress(f"model {model.card.name} {model.card.version} on {model.forward_runner.device}")
    pipeline = ExplainPipeline(model, methods=args.methods or ("gradcam", "occlusion"), outputs=("sc",))
    rows, failures = explain_paths(pipeline, [inputs], args.out, png=True)
    print_table(rows)
    print(f"\nSecondary Captures and PNG previews: {args.out.resolve()}/")
    return 1 if failures else 0
