"""The options and the report that ``pacs-xai demo train-healthy`` and ``pacs-xai model train-healthy`` share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from service.tools.healthy.train import HealthyReport, HealthySettings


def add_healthy_options(parser: argparse.ArgumentParser) -> None:
    """The options ``demo train-healthy`` and ``model train-healthy`` share."""
    parser.add_argument(
        "--figure",
        type=Path,
        default=Path("healthy-appearance-held-out.png"),
        metavar="PNG",
        help="the held-out reconstruction figure (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int_at_least(1), default=None, metavar="N", help="training epochs (default: as shipped)"
    )
    parser.add_argument(
        "--seed", type=int_at_least(0), default=None, metavar="N", help="random seed (default: as shipped)"
    )
    parser.add_argument(
        "--detail-sigma",
        type=float,
        default=None,
        metavar="PX",
        help="h(x) keeps the image's own detail finer than this many pixels; 0: the plain reconstruction "
        f"(default {HealthySettings.detail_sigma})",
    )


def healthy_settings(args: argparse.Namespace) -> HealthySettings:
    """The training settings with the command line's changes."""
    settings = HealthySettings()
    for option, field in (("epochs", "epochs"), ("seed", "seed"), ("detail_sigma", "detail_sigma")):
        if getattr(args, option) is not None:
            settings = replace(settings, **{field: getattr(args, option)})
    return settings


def print_healthy_report(report: HealthyReport, figure: Path) -> None:
    """The held-out figures and the files of a healthy-appearance training."""
    figures = report.figures
    print(f"held-out error of h(x) on normal images: {figures['normal_error']:.4f} (normalised units squared)")
    for name in ("nodule", "effusion"):
        if f"{name}_error_ratio" in figures:
            print(
                f"held-out {name} images: error {figures[f'{name}_inside_error']:.3f} inside the lesion, "
                f"{figures[f'{name}_outside_error']:.4f} outside it ({figures[f'{name}_error_ratio']:.0f} x)"
            )
    size = (report.path.stat().st_size + report.onnx_path.stat().st_size) / 1e6
    print(
        f"healthy-appearance model: {report.path}, {report.onnx_path.name} "
        f"({report.parameters:,} parameters, {size:.1f} MB together)"
    )
    print(f"held-out reconstruction figure: {figure}")
    print(
        f"model card: {report.card} (auxiliary.healthy_appearance updated)" if report.card else "model card: unchanged"
    )
    print(f"training took {report.seconds:.0f} s")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (a usage error naming the value otherwise); the
    demo commands' too."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse
