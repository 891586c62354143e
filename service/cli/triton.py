"""``pacs-xai triton export`` and ``pacs-xai triton serve``: a model card's graphs for Triton
Inference Server (:mod:`service.inference.graphs`, :mod:`service.tools.triton`)."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

from service.inference.card import ModelCard, ModelCardError
from service.inference.graphs import export_graphs
from service.models import demo_card_path
from service.tools.triton.launch import TritonLaunchError, TritonServer, serve_forever


def run_export(args: argparse.Namespace) -> int:
    try:
        card = ModelCard.load(args.card or demo_card_path())
        spec = export_graphs(card, Path(args.out), max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us)
    except ModelCardError as exc:
        print(f"error: {exc}")
        return 1
    print(
        f"wrote {args.out}: {spec.classifier_model}"
        + (f", {spec.cam_model} ({spec.target_layer})" if spec.cam_model else "")
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        card = ModelCard.load(args.card or demo_card_path())
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pacs-xai-triton-"))
        server = TritonServer(card, workdir, grpc_port=args.port, max_batch=args.max_batch, threads=args.threads)
        return serve_forever(server)
    except (ModelCardError, TritonLaunchError) as exc:
        print(f"error: {exc}")
        return 1


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    parser = commands.add_parser(
        "triton",
        formatter_class=formatter,
        help="the model's graphs on Triton Inference Server (the pooled GPU tier)",
        description=(
            "Export a model card's classifier and its CAM layer-gradient graph (traced with make_fx,\n"
            "saved with torch.export) for Triton, or serve them on 127.0.0.1 with the server of\n"
            ".venv-triton (make triton-venv). Workers use it with model.triton_url: host:port."
        ),
        epilog="examples:\n  pacs-xai triton export --out var/triton-graphs\n"
        "  pacs-xai triton serve service/models/demo --port 8001",
    )
    sub = parser.add_subparsers(dest="triton_command", required=True, metavar="COMMAND")
    export = sub.add_parser(
        "export",
        formatter_class=formatter,
        help="write the graphs and spec.json for service/tools/triton/serve.py",
        epilog="example:\n  pacs-xai triton export service/models/demo --out /models/triton --max-batch 64",
    )
    export.add_argument("card", nargs="?", help="model card YAML or folder (default: the demo model)")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--max-batch", type=int, default=32, help="images per forward pass at most (default 32)")
    export.add_argument(
        "--max-queue-delay-us", type=int, default=5000, help="dynamic batcher's wait for more images, µs (default 5000)"
    )
    export.set_defaults(handler=run_export)
    serve = sub.add_parser(
        "serve",
        formatter_class=formatter,
        help="export and serve on 127.0.0.1 until Ctrl-C",
        epilog="example:\n  pacs-xai triton serve service/models/demo --port 8001",
    )
    serve.add_argument("card", nargs="?", help="model card YAML or folder (default: the demo model)")
    serve.add_argument("--port", type=int, default=8001, help="gRPC port (default 8001)")
    serve.add_argument("--max-batch", type=int, default=32, help="images per forward pass at most (default 32)")
    serve.add_argument("--threads", type=int, default=0, help="torch CPU threads of the server (default: torch's)")
    serve.add_argument("--workdir", help="folder for the graphs and the log (default: a temp folder)")
    serve.set_defaults(handler=run_serve)
