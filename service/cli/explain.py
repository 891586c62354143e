"""``pacs-xai explain``: explain DICOM files offline into DICOM objects (and PNG previews)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.explain import ExplainerError, available_explainers
from service.inference.card import ModelCardError
from service.inference.deployed import DeployedModel
from service.models import demo_card_path
from service.node.offline import FileOutcome, explain_files, explain_series
from service.node.pipeline import OUTPUT_KINDS, DatasetResult, ExplainPipeline, PipelineConfigError
from service.node.volume import VOLUME_OUTPUTS, SeriesResult, VolumePipeline
from service.trust.ood import OodError

EXAMPLES = """examples:
  pacs-xai explain chest.dcm --method gradcam --out results/ --png
  pacs-xai explain study/ --method gradcam --method occlusion --out results/
  pacs-xai explain ct.dcm --method occlusion --force --out results/   # outside the card's applies_to
  pacs-xai explain ct-series/ --model service/models/volume_demo --method gradcam --out results/
      # a volume model: each series is one volume; outputs pm, seg_fractional, seg_binary, sc

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
    parser.add_argument(
        "--key-slices",
        type=int,
        default=None,
        metavar="N",
        help=f"volume models: Secondary Captures of the N slices with the most attribution only, not of every "
        f"slice (volume outputs: {', '.join(VOLUME_OUTPUTS)})",
    )
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
    #: The trust signals that flag the result: "shortcut suspected", "out of distribution" (empty: none).
    flags: str = ""


def run(args: argparse.Namespace) -> int:

    try:
        model = DeployedModel.from_card_path(args.model or demo_card_path())
        if model.card.input.kind == "volume":
            volume_pipeline = VolumePipeline(
                model,
                methods=args.methods or model.card.defaults.methods,
                outputs=args.outputs.split(",") if args.outputs else model.card.defaults.outputs,
                key_slices=args.key_slices,
                enforce_applies_to=not args.force,
            )
            return run_volumes(volume_pipeline, args)
        pipeline = ExplainPipeline(
            model,
            methods=args.methods or model.card.defaults.methods,
            outputs=args.outputs.split(",") if args.outputs else model.card.defaults.outputs,
            enforce_applies_to=not args.force,
        )
    except (ModelCardError, ExplainerError, PipelineConfigError, OodError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, failures = explain_paths(pipeline, args.paths, args.out, png=args.png)
    print_table(rows)
    if failures:
        print(f"{failures} file(s) failed; see the error lines above", file=sys.stderr)
    return 1 if failures else 0


def run_volumes(pipeline: VolumePipeline, args: argparse.Namespace) -> int:
    """Explain each series under ``args.paths`` as one volume; print one row per series and method."""
    rows: list[Row] = []
    failures = 0
    for outcome in explain_series(pipeline, args.paths, args.out, png=args.png):
        if outcome.error is not None:
            where = outcome.path if isinstance(outcome, FileOutcome) else f"series {outcome.series_instance_uid}"
            print(f"error: {where}: {outcome.error}", file=sys.stderr)
            failures += 1
        elif not isinstance(outcome, FileOutcome) and outcome.result is not None:
            rows.extend(series_rows(outcome.result))
    print_table(rows)
    if failures:
        print(f"{failures} file(s) or series failed; see the error lines above", file=sys.stderr)
    return 1 if failures else 0


def series_rows(result: SeriesResult) -> list[Row]:
    """Rows of one series: ``file`` is "series <UID> (<n> instances)"."""
    name = f"series {result.series_instance_uid} ({result.instances} instances)"
    if result.skipped_reason or result.prediction is None:
        return [Row(name, result.modality, "skipped", "", result.skipped_reason or "", "")]
    shared_ms = result.timings_ms.get("prepare", 0.0) + result.timings_ms.get("infer", 0.0)
    rows = []
    prediction = result.prediction
    for method in sorted({output.method for output in result.outputs}):
        timings = result.timings_ms
        ms = shared_ms + timings.get(f"explain:{method}", 0.0) + timings.get(f"encode:{method}", 0.0)
        probability = f"{prediction.probability:.3f}"
        rows.append(Row(name, result.modality, prediction.class_name, probability, method, f"{ms:.0f}"))
    return rows


def explain_paths(
    pipeline: ExplainPipeline, paths: Sequence[Path], out_dir: Path, *, png: bool
) -> tuple[list[Row], int]:
    """Explain every file under ``paths``; one bad file prints an error line and the rest go on."""
    rows: list[Row] = []
    failures = 0
    for outcome in explain_files(pipeline, paths, out_dir, png=png):
        if outcome.error is not None:
            print(f"error: {outcome.path}: {outcome.error}", file=sys.stderr)
            failures += 1
        else:
            rows.extend(result_rows(outcome.path, outcome.result))
    return rows, failures


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
        # a multi-label card: the findings explained in the first frame, with their probabilities
        findings = [v.finding for v in result.verdicts if v.method == method and v.frame_index == 0 and v.finding]
        shown, probability = predicted, f"{first.probability:.3f}"
        if any(output.finding for output in result.outputs):
            suffix = f" (+{frames - 1} frames)" if frames > 1 else ""
            shown = (", ".join(findings) or "no finding present") + suffix
            probability = ", ".join(f"{first.probabilities[result.classes.index(name)]:.3f}" for name in findings)
        verdicts = [verdict for verdict in result.verdicts if verdict.method == method]
        flags = [
            name
            for name, flagged in (
                ("shortcut suspected", any(v.shortcut.suspected for v in verdicts)),
                ("out of distribution", any(v.ood is not None and v.ood.out_of_distribution for v in verdicts)),
            )
            if flagged
        ]
        rows.append(Row(path.name, result.modality, shown, probability, method, f"{ms:.0f}", ", ".join(flags)))
    return sorted(rows, key=lambda row: row.method)


def print_table(rows: Sequence[Row]) -> None:
    """A plain aligned table on stdout: file, modality, predicted class, probability, method, ms, flags."""
    header = Row("file", "modality", "predicted", "probability", "method", "ms", "flags")
    table = [header, *rows]
    widths = [max(len(getattr(row, name)) for row in table) for name in Row.__dataclass_fields__]
    for row in table:
        cells = [getattr(row, name) for name in Row.__dataclass_fields__]
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
