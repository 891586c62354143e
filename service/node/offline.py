"""The pipeline on files, without the network (``pacs-xai explain``, ``pacs-xai demo offline``).

Each file is read, explained and its output objects written to a folder; a file that cannot be
read or explained is reported with its reason and the others go on. For a volume model the files
are grouped by series first, and each series is explained as one volume (:func:`explain_series`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_io.errors import DicomInputError
from dicom_io.pixels import read_dataset
from dicom_io.writers import save_png
from service.explain import ExplainerError
from service.node.pipeline import DatasetResult, ExplainPipeline
from service.node.volume import SeriesResult, VolumePipeline


@dataclass(frozen=True)
class FileOutcome:
    """One file's result, or the reason it has none."""

    path: Path
    result: DatasetResult | None = None
    error: str | None = None


def explain_files(
    pipeline: ExplainPipeline, paths: Sequence[Path], out_dir: Path, *, png: bool
) -> Iterator[FileOutcome]:
    """Explain every file under ``paths`` into ``out_dir``, one outcome per file, in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in iter_files(paths):
        try:
            result = pipeline.process(read_dataset(path))
            write_outputs(result, path, out_dir, png=png)
        except (DicomInputError, ExplainerError, OSError) as exc:
            yield FileOutcome(path, error=str(exc))
            continue
        yield FileOutcome(path, result=result)


def iter_files(paths: Iterable[Path]) -> Iterable[Path]:
    """Files named directly, and every non-hidden file below named folders, in sorted order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            yield path


def write_outputs(result: DatasetResult, source: Path, out_dir: Path, *, png: bool) -> list[Path]:
    """Write each output object as ``<source stem>_<method>_<kind>[_<finding>][_f<frame>].dcm`` (+ ``.png``);
    the finding where a multi-label model explains several per frame."""
    written = []
    multi_frame = len(result.predictions) > 1
    for output in result.outputs:
        finding = f"_{re.sub(r'[^A-Za-z0-9]+', '-', output.finding).strip('-')}" if output.finding else ""
        stem = f"{source.stem}_{output.method}_{output.kind}{finding}" + (
            f"_f{output.frame_index + 1}" if multi_frame else ""
        )
        path = out_dir / f"{stem}.dcm"
        output.dataset.save_as(path, enforce_file_format=True)
        written.append(path)
        if png and output.kind == "sc":
            save_png(output.dataset.pixel_array, out_dir / f"{stem}.png")
    return written


@dataclass(frozen=True)
class SeriesOutcome:
    """One series' result (for a volume model), or the reason it has none."""

    series_instance_uid: str
    result: SeriesResult | None = None
    error: str | None = None


def explain_series(
    pipeline: VolumePipeline, paths: Sequence[Path], out_dir: Path, *, png: bool
) -> Iterator[SeriesOutcome | FileOutcome]:
    """Read every file under ``paths``, group the instances by Series Instance UID and explain each
    series as one volume into ``out_dir``; an unreadable file is one outcome of its own."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series: dict[str, list] = {}
    for path in iter_files(paths):
        try:
            dataset = read_dataset(path)
        except (DicomInputError, OSError) as exc:
            yield FileOutcome(path, error=str(exc))
            continue
        series.setdefault(str(dataset.get("SeriesInstanceUID", "")), []).append(dataset)
    for uid, datasets in series.items():
        try:
            result = pipeline.process(datasets)
            write_series_outputs(result, out_dir, png=png)
        except (DicomInputError, ExplainerError, OSError) as exc:
            yield SeriesOutcome(uid, error=str(exc))
            continue
        yield SeriesOutcome(uid, result=result)


def write_series_outputs(result: SeriesResult, out_dir: Path, *, png: bool) -> list[Path]:
    """Write each output as ``<series UID>_<method>_<kind>[_s<slice>].dcm`` (+ ``.png`` for SCs)."""
    written = []
    for output in result.outputs:
        stem = f"{result.series_instance_uid}_{output.method}_{output.kind}"
        if output.kind == "sc":
            stem += f"_s{output.frame_index + 1:03d}"
        path = out_dir / f"{stem}.dcm"
        output.dataset.save_as(path, enforce_file_format=True)
        written.append(path)
        if png and output.kind == "sc":
            save_png(output.dataset.pixel_array, out_dir / f"{stem}.png")
    return written
