"""``pacs-xai explain``: explain DICOM files offline into DICOM objects (and PNG previews)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_io.errors import DicomInputError
from dicom_io.pixels import read_dataset
from dicom_io.writers import save_png
from service.explain import ExplainerError, available_explainers
from service.inference.card import ModelCardError
from service.inference.model import DeployedModel
from service.pipeline import OUTPUT_KINDS, DatasetResult, ExplainPipeline, PipelineConfigError

EXAMPLES = """examples:
  pacs-xai explain chest.dcm --method gradcam --out results/ --png
  pacs-xai explain study/ --method gradcam --method occlusion --out results/
  pacs-xai explain ct.dcm --method occlusion --force --out results/   # outside the card's applies_to

methods: {methods}
"""


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    parser = commands.add_parser(
        "explain",
        help="explain DICOM files into Secondary Captures",
        description="Run the model and the explainers on DICOM files and folders; write the results as DICOM.",
        epilog=EXAMPLES.format(methods=", ".join(available_explainers())),
        formatter_class=formatter,
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders (searched recursively)"
    )
    parser.add_argument(
        "--method",
        action="append",
        dest="methods",
        metavar="NAME",
        help="explainer registry name; repeat for several (default: the model card's)",
    )
    parser.add_argument(
        "--outputs",
        default=None,
        metavar="LIST",
        help=f"comma-separated output kinds, from: {', '.join(OUTPUT_KINDS)} (default: the card's)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the written objects")
    parser.add_argument("--png", action="store_true", help="also write a PNG preview of every Secondary Capture")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="CARD",
        help="model card YAML or its folder (default: the built-in demo model)",
    )
    parser.add_argument("--force", action="store_true", help="explain images the card's applies_to rules exclude")
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class Row:
    """One line of the summary table."""

    file: str
    modality: str
    predicted: str
    probability: str
    method: str
    milliseconds: str


def run(args: argparse.Namespace) -> int:
    from service.demo import demo_card_path

    try:
        model = DeployedModel.from_card_path(args.model or demo_card_path())
        pipeline = ExplainPipeline(
            model,
            methods=args.methods or model.card.defaults.methods,
            outputs=args.outputs.split(",") if args.outputs else model.card.defaults.outputs,
            enforce_applies_to=not args.force,
        )
    except (ModelCardError, ExplainerError, PipelineConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, failures = explain_paths(pipeline, args.paths, args.out, png=args.png)
    print_table(rows)
    if failures:
        print(f"{failures} file(s) failed; see the error lines above", file=sys.stderr)
    return 1 if failures else 0


def explain_paths(
    pipeline: ExplainPipeline, paths: Sequence[Path], out_dir: Path, *, png: bool
) -> tuple[list[Row], int]:
    """Explain every file under ``paths``; one bad file prints an error line and the rest go on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    failures = 0
    for path in iter_files(paths):
        try:
            result = pipeline.process(read_dataset(path))
            write_outputs(result, path, out_dir, png=png)
        except (DicomInputError, ExplainerError, OSError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        rows.extend(result_rows(path, result))
    return rows, failures


def iter_files(paths: Iterable[Path]) -> Iterable[Path]:
    """Files named directly, and every non-hidden file below named folders, in sorted order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            yield path


def write_outputs(result: DatasetResult, source: Path, out_dir: Path, *, png: bool) -> list[Path]:
    """Write each output object as ``<source stem>_<method>_<kind>[_f<frame>].dcm`` (+ ``.png``)."""
    written = []
    multi_frame = len(result.predictions) > 1
    for output in result.outputs:
        stem = f"{source.stem}_{output.method}_{output.kind}" + (f"_f{output.frame_index + 1}" if multi_frame else "")
        path = out_dir / f"{stem}.dcm"
        output.dataset.save_as(path, enforce_file_format=True)
        written.append(path)
        if png and output.kind == "sc":
            save_png(output.dataset.pixel_array, out_dir / f"{stem}.png")
    return written


def result_rows(path: Path, result: DatasetResult) -> list[Row]:
    if result.skipped_reason:
        return [Row(path.name, result.modality, "skipped", "", result.skipped_reason, "")]
    rows = []
    frames = len(result.predictions)
    first = result.predictions[0]
    predicted = first.class_name if frames == 1 else f"{first.class_name} (+{frames - 1} frames)"
    shared_ms = result.timings_ms.get("prepare", 0.0) + result.timings_ms.get("infer", 0.0)
    for method in {output.method for output in result.outputs} or {""}:
        ms = (
            shared_ms + result.timings_ms.get(f"explain:{method}", 0.0) + result.timings_ms.get(f"encode:{method}", 0.0)
        )
        rows.append(Row(path.name, result.modality, predicted, f"{first.probability:.3f}", method, f"{ms:.0f}"))
    return sorted(rows, key=lambda row: row.method)


def print_table(rows: Sequence[Row]) -> None:
    """A plain aligned table on stdout: file, modality, predicted class, probability, method, ms."""
    header = Row("file", "modality", "predicted", "probability", "method", "ms")
    table = [header, *rows]
    widths = [max(len(getattr(row, name)) for row in table) for name in Row.__dataclass_fields__]
    for row in table:
        cells = [getattr(row, name) for name in Row.__dataclass_fields__]
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
