"""``pacs-xai route FILE...``: which routing rule would take each file, and why the others would not."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from dicom_io.errors import DicomInputError
from service.node.config import ConfigError, load_config
from service.node.offline import iter_files
from service.node.routing import InstanceFacts, compile_rules, evaluate, read_header


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    route = commands.add_parser(
        "route",
        help="show which routing rule takes each file, and why not the others",
        formatter_class=formatter,
        description="Apply the config's routes (or, without routes, the default rule from the model card's "
        "applies_to) to DICOM files, as the node would when they arrive together as one batch: for each file "
        "the rules that take it, and for every other rule the first attribute that does not match, with its "
        "value. Files of one series count together for match.instances. Prints UIDs and attributes, never "
        "patient names or IDs. Exit code 0 when every file was read, 1 otherwise.",
        epilog="examples:\n  pacs-xai route study/ --config node.yaml\n"
        "  pacs-xai route ct/*.dcm cr.dcm --config node.yaml --calling-ae ORTHANC",
    )
    route.add_argument("paths", nargs="+", type=Path, metavar="FILE", help="DICOM files or folders (recursive)")
    route.add_argument("--config", type=Path, metavar="FILE", help="node config (default: the built-in defaults)")
    route.add_argument(
        "--calling-ae",
        default="",
        metavar="AE",
        help="the AE title the files would arrive from (for match.calling_ae_title; default none)",
    )
    route.set_defaults(handler=_route)


def _route(args: argparse.Namespace) -> int:
    try:
        rules = compile_rules(load_config(args.config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    headers = []
    failed = 0
    for path in iter_files(args.paths):
        try:
            headers.append((path, read_header(path)))
        except DicomInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    per_series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in headers)
    for path, ds in headers:
        facts = InstanceFacts.from_dataset(
            ds, instances=per_series[str(ds.get("SeriesInstanceUID", ""))], calling_ae_title=args.calling_ae
        )
        verdicts = evaluate(rules, facts)
        taken = [v.rule.name for v in verdicts if v.taken]
        verdict = ", ".join(taken) if taken else "not routed (the node would not keep it)"
        kind = facts.modality or "no modality"
        print(
            f"{path.name}: SOP Instance {facts.sop_instance_uid} ({kind}, series {facts.series_instance_uid}, "
            f"{facts.instances} instance(s) given) -> {verdict}"
        )
        for rule_verdict in verdicts:
            print(f"  {rule_verdict.describe()}")
    print(f"{len(headers)} file(s) read, {failed} unreadable")
    return 1 if failed else 0
