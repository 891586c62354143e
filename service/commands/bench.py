"""``pacs-xai bench ...``: benchmarks that measure pacs-xai against a peer in the same run."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


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
        epilog="example:\n  pacs-xai bench receive --count 200 --associations 1 --associations 4",
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
        epilog="example:\n  pacs-xai bench pipeline --method gradcam --images 20 --burst 20",
    )
    pipeline.add_argument("--method", default="gradcam", metavar="NAME", help="explainer (default gradcam)")
    pipeline.add_argument("--images", type=int, default=20, metavar="N", help="images sent one by one (default 20)")
    pipeline.add_argument(
        "--burst", type=int, default=20, metavar="N", help="images in the saturation burst (default 20)"
    )
    pipeline.add_argument("--out", type=Path, default=Path("bench-out"), metavar="DIR", help="folder for the JSON")
    pipeline.set_defaults(handler=_pipeline)


def _receive(args: argparse.Namespace) -> int:
    from service.bench.receive import print_figures, run_receive_bench
    from service.demo.node_demo import main_progress

    figures = run_receive_bench(args.count, args.associations or [1, 4], args.out, main_progress)
    print_figures(figures)
    print(f"\nfigures: {args.out / 'receive.json'}, plot: {args.out / 'receive.png'}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from service.bench.pipeline import print_figures, run_pipeline_bench
    from service.demo.node_demo import main_progress

    figures = run_pipeline_bench(args.method, args.images, args.burst, args.out, main_progress)
    print_figures(figures)
    print(f"\nfigures: {args.out / f'pipeline-{args.method}.json'}")
    return 0
