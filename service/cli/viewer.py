"""``pacs-xai viewer``: the results in OHIF on Orthanc, on 127.0.0.1 (the stack is
:mod:`service.tools.viewer.stack`)."""

from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from service.tools.orthanc import OrthancError
from service.tools.viewer.stack import ALL_OUTPUTS, OHIF_VERSION, StudyResults, ViewerStack, ohif_link


def print_links(base_url: str, results: list[StudyResults]) -> None:
    for study in results:
        print(f"\n{study.name}  study {study.study_uid}")
        print(f"  {'study (all series)':<22} {ohif_link(base_url, study.study_uid)}")
        for series in study.series:
            label = f"{series.kind} ({series.modality})"
            print(f"  {label:<22} {ohif_link(base_url, study.study_uid, series.series_uid)}")


def run_viewer(args: argparse.Namespace) -> int:
    folder = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="pacs-xai-viewer-"))
    stack = ViewerStack(folder, port=args.port, outputs=tuple(args.outputs.split(",")), method=args.method)
    stopped = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        print(f"starting Orthanc (DICOMweb), the pacs-xai node and OHIF {OHIF_VERSION} behind nginx in {folder}")
        stack.start()
        assert stack.orthanc is not None
        print(
            f"Orthanc REST/DICOMweb {stack.orthanc.url}  DICOM {stack.orthanc.ae_title}@127.0.0.1:"
            f"{stack.orthanc.dicom_port}  node PACSXAI@127.0.0.1:{stack.node.port}"
        )
        print(f"sending {args.studies} demo phantom studies through Orthanc to the node ...")
        started = time.monotonic()
        results = stack.send_demo_studies(args.studies)
        print(f"results back in Orthanc after {time.monotonic() - started:.1f} s")
        print(f"\nOHIF: {stack.url}/  (study list)")
        print_links(stack.url, results)
        if args.once:
            return 0
        print("\nrunning; press Ctrl-C to stop everything")
        while not stopped.wait(1.0):
            pass
        return 0
    except KeyboardInterrupt:
        return 0
    except OrthancError as exc:  # ViewerError included
        print(f"error: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("stopping nginx, the node and Orthanc")
        stack.stop()
        if not args.data_dir:
            shutil.rmtree(folder, ignore_errors=True)


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    parser = commands.add_parser(
        "viewer",
        formatter_class=formatter,
        help="see the results in OHIF: Orthanc + node + OHIF on 127.0.0.1 (until Ctrl-C)",
        description=(
            "Start, on 127.0.0.1, Orthanc with DICOMweb as the PACS, the pacs-xai node with the demo model\n"
            f"routing its results back into it, and OHIF {OHIF_VERSION} behind nginx (fetched with npm into\n"
            "~/.cache/pacs-xai/ohif/ when missing; set PACS_XAI_CACHE to move it). Send the demo phantom\n"
            "studies through Orthanc to the node and print, per study, the OHIF link to the source and to\n"
            "each result series. Runs until Ctrl-C, then stops everything it started.\n"
            "Needs the Debian packages orthanc, orthanc-dicomweb, nginx and npm."
        ),
        epilog="examples:\n  pacs-xai viewer\n  pacs-xai viewer --port 8080 --studies 3 --outputs sc,pm,seg_binary",
    )
    parser.add_argument("--port", type=int, default=0, help="nginx port for OHIF on 127.0.0.1 (default: a free one)")
    parser.add_argument("--studies", type=int, default=3, help="demo phantom studies to send (default 3)")
    parser.add_argument("--outputs", default=",".join(ALL_OUTPUTS), help="result kinds (default: all five)")
    parser.add_argument("--method", default="gradcam", help="explainer (default gradcam)")
    parser.add_argument("--data-dir", help="keep Orthanc's, the node's and nginx's files here (default: a temp folder)")
    parser.add_argument("--once", action="store_true", help="print the links and stop (no waiting for Ctrl-C)")
    parser.set_defaults(handler=run_viewer)
