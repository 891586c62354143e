"""The ``pacs-xai`` command line.

Every subcommand has ``--help`` with an example. Errors are one line that names the file and the
reason; the exit code is 0 when everything worked, 1 when some input failed, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from service import __version__
from service.cli import bench as bench_commands
from service.cli import demo as demo_commands
from service.cli import evaluate as evaluate_command
from service.cli import explain as explain_command
from service.cli import model as model_commands
from service.cli import node as node_commands
from service.cli import route as route_command
from service.cli import triton as triton_commands
from service.cli import viewer as viewer_command
from service.cli import visualize as visualize_command


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-xai",
        formatter_class=_formatter,
        description="Explain an image classifier's decisions on DICOM images and return them as DICOM objects.",
        epilog="examples:\n  pacs-xai serve --destination ORTHANC@127.0.0.1:4242\n"
        "  pacs-xai explain study/ --method gradcam --out results/ --png\n  pacs-xai demo run\n"
        "  pacs-xai model calibrate service/models/demo/model.yaml --phantoms 900",
    )
    parser.add_argument("--version", action="version", version=f"pacs-xai {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (no patient data is logged)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node_commands.register(commands, _formatter)
    route_command.register(commands, _formatter)
    explain_command.register(commands, _formatter)
    evaluate_command.register(commands, _formatter)
    demo_commands.register(commands, _formatter)
    model_commands.register(commands, _formatter)
    bench_commands.register(commands, _formatter)
    triton_commands.register(commands, _formatter)
    viewer_command.register(commands, _formatter)
    visualize_command.register(commands, _formatter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args))
