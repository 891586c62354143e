"""``pacs-xai bench compression``: bytes and time of the lossless transfer syntaxes on the node's
own result, and the JPEG 2000 decoders on radiographs.

1. The Secondary Capture the node writes for a 1955x1841 CR (``RG1_UNCR.dcm``, Grad-CAM, the demo
   model), as stored today (uncompressed RGB) and in each lossless syntax the node can send
   (:mod:`dicom_io.compression`): bytes, encode and decode milliseconds (median of ``repeats``),
   and whether the decoded pixels equal the original.
2. JPEG 2000 decode of ``RG1_J2KR.dcm`` (lossless) and ``RG1_J2KI.dcm`` (lossy) from pydicom-data
   with every decoding plugin pydicom can load here (GDCM, pylibjpeg-openjpeg, Pillow): median
   milliseconds, plugins interleaved so a change of machine load weighs on all alike, and the
   check that each gives the same pixels. The fastest is what :mod:`dicom_io.pixels.decode` uses.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.compression import LOSSLESS_SYNTAXES, compress_pixels
from service.inference.deployed import PoolSettings
from service.node.config import load_config
from service.node.metrics import create_metrics
from service.node.processor import encode
from service.node.routing import ModelRegistry, Router
from service.tools.progress import Progress

SOURCE = "RG1_UNCR.dcm"
J2K_SOURCES = ("RG1_J2KR.dcm", "RG1_J2KI.dcm")


@dataclass(frozen=True)
class SyntaxFigure:
    syntax: str
    bytes: int
    ratio: float  # uncompressed bytes / these bytes
    encode_ms: float
    decode_ms: float
    lossless: bool


@dataclass(frozen=True)
class DecoderFigure:
    source: str
    plugin: str
    decode_ms: float
    same_pixels: bool


def run_compression_bench(
    repeats: int, out_dir: Path, progress: Progress
) -> tuple[list[SyntaxFigure], list[DecoderFigure]]:
    config = load_config(None, {"explain": {"methods": ["gradcam"], "outputs": ["sc"]}})
    models = ModelRegistry(device=config.model.device, pool=PoolSettings(), metrics=create_metrics().pool)
    try:
        progress(f"explaining {SOURCE} for its Secondary Capture")
        pipeline = Router.build(config, models).pipelines()[0]
        (output,) = pipeline.process(pydicom.dcmread(_data(SOURCE))).outputs
    finally:
        models.close()
    stored = encode(output.dataset)
    original = pydicom.dcmread(io.BytesIO(stored)).pixel_array
    syntaxes = [SyntaxFigure("uncompressed", len(stored), 1.0, 0.0, 0.0, True)]
    for name, uid in LOSSLESS_SYNTAXES.items():
        encode_times, decode_times, data = [], [], b""
        for _ in range(repeats):
            dataset = pydicom.dcmread(io.BytesIO(stored))
            started = time.perf_counter()
            if compress_pixels(dataset, [uid]) is None:  # deflated: the whole data set through zlib
                dataset.file_meta.TransferSyntaxUID = uid
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            encode_times.append(time.perf_counter() - started)
            data = buffer.getvalue()
            started = time.perf_counter()
            decoded = pydicom.dcmread(io.BytesIO(data)).pixel_array
            decode_times.append(time.perf_counter() - started)
        figure = SyntaxFigure(
            name,
            len(data),
            round(len(stored) / len(data), 2),
            round(statistics.median(encode_times) * 1000, 1),
            round(statistics.median(decode_times) * 1000, 1),
            bool(np.array_equal(decoded, original)),
        )
        progress(f"{name}: {figure.bytes} bytes ({figure.ratio}x fewer), encode {figure.encode_ms} ms")
        syntaxes.append(figure)
    decoders = []
    for source in J2K_SOURCES:
        dataset = pydicom.dcmread(_data(source))
        decoder = get_decoder(dataset.file_meta.TransferSyntaxUID)
        plugins = list(decoder.available_plugins)
        times: dict[str, list[float]] = {plugin: [] for plugin in plugins}
        arrays: dict[str, np.ndarray] = {}
        for _ in range(repeats):
            for plugin in plugins:
                started = time.perf_counter()
                arrays[plugin], _ = decoder.as_array(dataset, index=0, as_rgb=True, decoding_plugin=plugin)
                times[plugin].append(time.perf_counter() - started)
        reference = arrays[plugins[0]]
        for plugin in plugins:
            figure = DecoderFigure(
                source,
                plugin,
                round(statistics.median(times[plugin]) * 1000, 1),
                bool(np.array_equal(arrays[plugin], reference)),
            )
            progress(f"{source} with {plugin}: {figure.decode_ms} ms")
            decoders.append(figure)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compression.json").write_text(
        json.dumps(
            {"syntaxes": [asdict(f) for f in syntaxes], "jpeg2000_decoders": [asdict(f) for f in decoders]}, indent=2
        )
    )
    return syntaxes, decoders


def _data(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed: install the 'demo' extra (pydicom-data)")
    return str(path)


def print_figures(syntaxes: list[SyntaxFigure], decoders: list[DecoderFigure]) -> None:
    print(f"Secondary Capture of {SOURCE} (stored as {ExplicitVRLittleEndian.name} today):")
    print(f"  {'syntax':20} {'bytes':>10} {'x fewer':>8} {'encode ms':>10} {'decode ms':>10} lossless")
    for f in syntaxes:
        print(f"  {f.syntax:20} {f.bytes:>10} {f.ratio:>8.2f} {f.encode_ms:>10.1f} {f.decode_ms:>10.1f} {f.lossless}")
    print("JPEG 2000 decode, median ms:")
    for f in decoders:
        print(f"  {f.source:14} {f.plugin:10} {f.decode_ms:>8.1f}  same pixels as the first plugin: {f.same_pixels}")
