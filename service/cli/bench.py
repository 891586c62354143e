"""``pacs-xai bench ...``: benchmarks that measure pacs-xai against a peer in the same run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from service.explain.registry import get_explainer
from service.inference.card import ModelCard
from service.models import demo_card_path
from service.node.config import load_config, resolve_processes
from service.node.pipeline import card_settings
from service.tools.bench import compression as compression_bench
from service.tools.bench import explain as explain_bench
from service.tools.bench import pipeline as pipeline_bench
from service.tools.bench import receive as receive_bench
from service.tools.bench import soak as soak_bench
from service.tools.bench import throughput as throughput_bench
from service.tools.bench import volume as volume_bench
from service.tools.evaluate.variants import split_variant, variant_settings
from service.tools.progress import print_progress


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmarks (figures written to a folder)",
        formatter_class=formatter,
        description="Benchmarks: each measures pacs-xai and its reference peer on the same machine in the same run.",
        epilog="example:\n  pacs-xai bench receive --count 200 --associations 1 --associations 4 --out bench-out",
    )
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    receive = sub.add_parser(
        "receive",
        formatter_class=formatter,
        help="images/s into the durable spool vs DCMTK storescp",
        description="Send N instances (CT 512² and CR ~2k²) over 1 and K parallel associations to the node's "
        "receive path and to DCMTK storescp, with the same sender; print images/s and the ratio.",
        epilog="examples:\n  pacs-xai bench receive --count 200 --associations 1 --associations 4\n"
        "  pacs-xai bench receive --count 400 --associations 4 --receivers 2 --receivers 4",
    )
    receive.add_argument("--count", type=int, default=200, metavar="N", help="instances per image kind (default 200)")
    receive.add_argument(
        "--associations",
        type=int,
        action="append",
        metavar="K",
        help="parallel associations; repeat (default: 1 and 4)",
    )
    receive.add_argument(
        "--receivers",
        type=int,
        action="append",
        metavar="K",
        help="instead: one receiver process against K receiver processes on one port, over the largest "
        "--associations (default 4); repeat for several K",
    )
    receive.add_argument(
        "--rounds", type=int, default=3, metavar="N", help="with --receivers: alternating rounds, medians (default 3)"
    )
    receive.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out"),
        metavar="DIR",
        help="folder for receive.json and receive.png (default bench-out)",
    )
    receive.set_defaults(handler=_receive)
    pipeline = sub.add_parser(
        "pipeline",
        formatter_class=formatter,
        help="end-to-end latency and throughput vs the pure compute",
        description="Sender -> node -> destination on 127.0.0.1 with CR 2k² images: p50/p95 latency from C-STORE "
        "to the Secondary Capture acknowledged at the destination, throughput at saturation, and the pure compute "
        "time on the same images, so the pipeline overhead is a ratio.",
        epilog="examples:\n  pacs-xai bench pipeline --method gradcam --images 20 --burst 20\n"
        "  pacs-xai bench pipeline --method gradcam --images 10 --burst 40 --processes auto --receivers auto",
    )
    pipeline.add_argument("--method", default="gradcam", metavar="NAME", help="explainer (default gradcam)")
    pipeline.add_argument("--images", type=int, default=20, metavar="N", help="images sent one by one (default 20)")
    pipeline.add_argument(
        "--burst", type=int, default=20, metavar="N", help="images in the saturation burst (default 20)"
    )
    pipeline.add_argument(
        "--source",
        default="RG1_UNCR.dcm",
        metavar="FILE",
        help="image sent (fresh UIDs per copy): a DICOM file, or a pydicom test file's name (default RG1_UNCR.dcm, "
        "a 1955x1841 CR from pydicom-data)",
    )
    pipeline.add_argument("--out", type=Path, default=Path("bench-out"), metavar="DIR", help="folder for the JSON")
    pipeline.add_argument(
        "--processes",
        metavar="auto|N",
        help="compare the single-process node with N worker processes (auto: from the cores) and "
        "--receivers receiver processes, same images, same run",
    )
    pipeline.add_argument(
        "--receivers", metavar="auto|N", default="auto", help="receiver processes with --processes (default auto)"
    )
    pipeline.add_argument(
        "--rounds",
        type=int,
        default=3,
        metavar="N",
        help="with --processes: alternating rounds of --images and --burst per node (default 3)",
    )
    pipeline.set_defaults(handler=_pipeline)
    compression = sub.add_parser(
        "compression",
        formatter_class=formatter,
        help="bytes and time of the lossless syntaxes on the node's result; JPEG 2000 decoders",
        description="The Secondary Capture the node writes for a 2k² CR, uncompressed and in every lossless "
        "transfer syntax the node sends (bytes, encode/decode ms), and JPEG 2000 decode time with every "
        "decoding plugin pydicom loads here (GDCM, pylibjpeg-openjpeg, Pillow).",
        epilog="example:\n  pacs-xai bench compression --repeats 5 --out bench-out",
    )
    compression.add_argument("--repeats", type=int, default=5, metavar="N", help="repeats per figure (default 5)")
    compression.add_argument(
        "--out", type=Path, default=Path("bench-out"), metavar="DIR", help="folder for compression.json"
    )
    compression.set_defaults(handler=_compression)
    explain = sub.add_parser(
        "explain",
        formatter_class=formatter,
        help="every explainer's time, memory and forward passes vs Captum / pytorch-grad-cam / MONAI",
        description="For every registered explainer (or --methods), on the demo model and a DenseNet-121-sized "
        "model at 224²: wall time and peak memory per image, forward passes and the floor (passes x the model's "
        "own per-sample time), next to Captum, pytorch-grad-cam and MONAI at matched settings where they have "
        "the method; then HiPe against RISE (forward passes, deletion AUC) on phantom nodules. A method that "
        "cannot run on a model is listed as n/a with the reason; a peer that is not installed, as such. Writes "
        "explain.json and explain.png. On a CPU, DenseNet-121 is slow: pick --methods and small settings.",
        epilog="examples:\n"
        "  pacs-xai bench explain --models demo --images 4\n"
        "  pacs-xai bench explain --models densenet121 --methods integrated_gradients --methods occlusion "
        "--images 1 --repeats 1 --param occlusion.stride=16\n"
        "  pacs-xai bench explain --models demo --methods occlusion --methods occlusion:healthy "
        "--param occlusion:healthy.perturbation=healthy\n"
        "  pacs-xai bench explain --volume --size 96 --window 16 --stride 16   # 3D, against MONAI",
    )
    explain.add_argument(
        "--volume",
        action="store_true",
        help="instead: 3D Grad-CAM and 3D occlusion on MONAI's DenseNet121 (spatial_dims=3) against MONAI's "
        "GradCAM and OcclusionSensitivity; writes explain-volume.json and explain-volume.png",
    )
    explain.add_argument("--size", type=int, default=96, metavar="N", help="--volume: voxels per side (default 96)")
    explain.add_argument(
        "--window", type=int, default=16, metavar="N", help="--volume: occlusion cube side (default 16)"
    )
    explain.add_argument("--stride", type=int, default=16, metavar="N", help="--volume: occlusion stride (default 16)")
    explain.add_argument(
        "--methods",
        action="append",
        metavar="NAME[:LABEL]",
        help="explainer to measure, or a variant of one with its own --param NAME:LABEL.SETTING=VALUE (no peers); "
        "repeat (default: every registered one)",
    )
    explain.add_argument(
        "--models",
        action="append",
        metavar="NAME[,NAME]",
        help="demo and/or densenet121, comma separated or repeated (default: both)",
    )
    explain.add_argument("--images", type=int, default=4, metavar="N", help="images per call (default 4)")
    explain.add_argument(
        "--repeats", type=int, default=3, metavar="N", help="timed calls after the warm-up; median kept (default 3)"
    )
    explain.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="METHOD.SETTING=VALUE",
        help="replace a method's default setting, also for its peers; repeat (e.g. rise.masks=1000)",
    )
    explain.add_argument(
        "--compare-images",
        type=int,
        default=3,
        metavar="N",
        help="phantom nodules for HiPe vs RISE on the demo model; 0 skips it (default 3)",
    )
    explain.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu"
    )
    explain.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out"),
        metavar="DIR",
        help="folder for explain.json and explain.png (default bench-out)",
    )
    explain.set_defaults(handler=_explain)
    throughput = sub.add_parser(
        "throughput",
        formatter_class=formatter,
        help="batched Grad-CAM images/s vs pytorch-grad-cam (the GPU figure)",
        description="Grad-CAM on whole batches of B images of a DenseNet-121-sized model (or the demo model) at "
        "224², batch in host memory and maps back in host memory: images/s and peak memory per batch size, next to "
        "pytorch-grad-cam's GradCAM on the same layer, batch and targets in the same run (its maps compared with "
        "ours). The design goal is >= 1,000 images/s on one GPU (an H100 gave 2,397 at batch 256). Writes "
        "throughput.json and throughput.png.",
        epilog="examples:\n"
        "  pacs-xai bench throughput --device cuda --batch 64 --batch 256\n"
        "  pacs-xai bench throughput --device cpu --model demo --batch 8 --images 32",
    )
    throughput.add_argument(
        "--model", default="densenet121", choices=("densenet121", "demo"), help="model (default densenet121)"
    )
    throughput.add_argument(
        "--batch",
        type=int,
        action="append",
        metavar="B",
        help="batch size; repeat (default: 32, 64, 128, 256 on a GPU; 4, 16 on a CPU)",
    )
    throughput.add_argument(
        "--images",
        type=int,
        default=None,
        metavar="N",
        help="images timed per batch size (default 2048 on a GPU, 32 on a CPU)",
    )
    throughput.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu"
    )
    throughput.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out"),
        metavar="DIR",
        help="folder for throughput.json and throughput.png (default bench-out)",
    )
    throughput.set_defaults(handler=_throughput)
    soak = sub.add_parser(
        "soak",
        formatter_class=formatter,
        help="thousands of instances: the node's memory, file descriptors and threads over time vs storescp",
        description="Send N instances (CT 128², fresh UIDs) over K parallel associations (DCMTK storescu) into the "
        "node's receive path (guarded SCP, parse, spool, journal) and, with the same senders, into DCMTK storescp; "
        "sample resident memory, open file descriptors and threads of each receiver 4 times a second. Prints the "
        "figures after warm-up (the first 10 %%) and at the end; writes soak.json and soak.png.",
        epilog="example:\n  pacs-xai bench soak --count 5000 --associations 4 --out bench-out",
    )
    soak.add_argument("--count", type=int, default=5000, metavar="N", help="instances (default 5000)")
    soak.add_argument("--associations", type=int, default=4, metavar="K", help="parallel associations (default 4)")
    soak.add_argument(
        "--durability",
        choices=("power-loss", "process-crash"),
        default="power-loss",
        help="the node's storage.durability (default power-loss: fsync before Success)",
    )
    soak.add_argument("--no-peer", action="store_true", help="leave out DCMTK storescp")
    soak.add_argument(
        "--out", type=Path, default=Path("bench-out"), metavar="DIR", help="folder for soak.json and soak.png"
    )
    soak.set_defaults(handler=_soak)


def _soak(args: argparse.Namespace) -> int:
    figures = soak_bench.run_soak_bench(
        args.count, args.associations, args.out, print_progress, durability=args.durability, peer=not args.no_peer
    )
    soak_bench.print_figures(figures)
    print(f"\nfigures: {args.out / 'soak.json'}, plot: {args.out / 'soak.png'}")
    return 0


def _count(text: str) -> int | str:
    """``auto`` or a positive integer, as the configuration takes it."""
    return text if text == "auto" else int(text)


def _receive(args: argparse.Namespace) -> int:
    if args.receivers:
        associations = max(args.associations or [4])
        processes = receive_bench.run_receivers_bench(
            args.count, associations, args.receivers, args.out, print_progress
        )
        receive_bench.print_processes(processes)
        print(f"\nfigures: {args.out / 'receive-processes.json'}")
        return 0
    figures = receive_bench.run_receive_bench(args.count, args.associations or [1, 4], args.out, print_progress)
    receive_bench.print_figures(figures)
    print(f"\nfigures: {args.out / 'receive.json'}, plot: {args.out / 'receive.png'}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    if args.processes:
        resolved = resolve_processes(
            load_config(
                None,
                {"listener": {"processes": _count(args.receivers)}, "workers": {"processes": _count(args.processes)}},
            )
        )
        figures = pipeline_bench.run_processes_bench(
            args.method, args.images, args.burst, *resolved, args.out, print_progress, args.source, args.rounds
        )
        pipeline_bench.print_processes(figures)
        print(f"\nfigures: {args.out / f'pipeline-processes-{args.method}.json'}")
        return 0
    figures = pipeline_bench.run_pipeline_bench(
        args.method, args.images, args.burst, args.out, print_progress, args.source
    )
    pipeline_bench.print_figures(figures)
    print(f"\nfigures: {args.out / f'pipeline-{args.method}.json'}")
    return 0


def _compression(args: argparse.Namespace) -> int:
    syntaxes, decoders = compression_bench.run_compression_bench(args.repeats, args.out, print_progress)
    compression_bench.print_figures(syntaxes, decoders)
    print(f"\nfigures: {args.out / 'compression.json'}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    if args.volume:
        try:
            figures = volume_bench.run_volume_bench(
                args.out,
                print_progress,
                size=args.size,
                window=args.window,
                stride=args.stride,
                repeats=args.repeats,
                device=args.device,
            )
        except ValueError as exc:
            print(f"pacs-xai bench explain --volume: {exc}", file=sys.stderr)
            return 2
        volume_bench.print_volume_figures(figures)
        print(f"\nfigures: {args.out / 'explain-volume.json'}, plot: {args.out / 'explain-volume.png'}")
        return 0
    models = [
        name.strip()
        for value in args.models or [",".join(explain_bench.MODELS)]
        for name in value.split(",")
        if name.strip()
    ]
    params: dict[str, dict[str, object]] = {}
    try:
        explain_bench.check_request(args.methods, models, args.images, args.repeats, args.compare_images)
        for text in args.param:
            method, setting, value = explain_bench.parse_param(text)
            params.setdefault(method, {})[setting] = value
        demo_card = ModelCard.load(demo_card_path())  # its files (masker, healthy model), as the bench passes them
        for entry in params:  # a wrong setting stops here, not after the run
            method = split_variant(entry)[0]
            get_explainer(method, **{**card_settings(demo_card, method), **variant_settings(entry, params)})
    except ValueError as exc:
        print(f"pacs-xai bench explain: {exc}", file=sys.stderr)
        return 2
    figures = explain_bench.run_explain_bench(
        args.methods,
        models,
        args.images,
        args.out,
        print_progress,
        repeats=args.repeats,
        device=args.device,
        params=params,
        compare_images=args.compare_images,
    )
    explain_bench.print_figures(figures)
    print(f"\nfigures: {args.out / 'explain.json'}, plot: {args.out / 'explain.png'}")
    return 0


def _throughput(args: argparse.Namespace) -> int:
    try:
        figures = throughput_bench.run_throughput_bench(
            args.model, args.batch, args.images, args.out, print_progress, args.device
        )
    except ValueError as exc:
        print(f"pacs-xai bench throughput: {exc}", file=sys.stderr)
        return 2
    throughput_bench.print_figures(figures)
    print(f"\nfigures: {args.out / 'throughput.json'}, plot: {args.out / 'throughput.png'}")
    return 0
