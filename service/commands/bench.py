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


def _receive(args: argparse.Namespace) -> int:
    from service.bench.receive import print_figures, run_receive_bench
    from service.demo.node_demo import main_progress

    figures = run_receive_bench(args.count, args.associations or [1, 4], args.out, main_progress)
    print_figures(figures)
    print(f"\nfigures: {args.out / 'receive.json'}, plot: {args.out / 'receive.png'}")
    return 0
