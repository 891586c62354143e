"""``pacs-xai serve``, ``send``, ``config`` and ``outbox``: running and operating the node."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_io.net.scu import Destination, StoreSCU
from service.explain import ExplainerError
from service.inference.card import ModelCard, ModelCardError
from service.node.app import Node
from service.node.config import ConfigError, example_config, load_config, resolve_processes
from service.node.logs import configure_logging
from service.node.offline import iter_files
from service.node.pipeline import card_settings
from service.node.routing import check_rules, compile_rules
from service.node.store import Journal
from service.node.supervisor import WATCH_SECONDS, Supervisor
from service.tools.evaluate.sanity import randomisation_verdict
from service.tools.progress import print_progress


class FlagError(ValueError):
    """A command-line flag's value is malformed."""


def register(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    _register_serve(commands, formatter)
    _register_send(commands, formatter)
    _register_config(commands, formatter)
    _register_outbox(commands, formatter)


# --- serve ----------------------------------------------------------------------------------


def _register_serve(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the DICOM node",
        formatter_class=formatter,
        description="Receive studies by C-STORE, explain them, send the results to the destinations. "
        "Without --config the node runs on defaults: demo model, AE PACSXAI, port 11112, data in ./var.",
        epilog="examples:\n  pacs-xai serve\n  pacs-xai serve --config /etc/pacs-xai/node.yaml\n"
        "  pacs-xai serve --port 11112 --allow ORTHANC@127.0.0.1 --destination ORTHANC@127.0.0.1:4242",
    )
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML config (see: pacs-xai config example)")
    _add_override_flags(serve)
    serve.set_defaults(handler=_serve)


def _add_override_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, metavar="N", help="DICOM port")
    parser.add_argument("--bind", metavar="ADDR", help="listen address (default 127.0.0.1)")
    parser.add_argument("--ae-title", metavar="AE", help="our AE title")
    parser.add_argument("--destination", action="append", metavar="AE@HOST:PORT", help="send results here (repeatable)")
    parser.add_argument("--allow", action="append", metavar="AE[@HOST]", help="allowed calling AE (repeatable)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="spool and journal folder")
    parser.add_argument("--method", action="append", dest="methods", metavar="NAME", help="explainer (repeatable)")
    parser.add_argument("--outputs", metavar="LIST", help="comma-separated output kinds, e.g. sc,pm")


def overrides_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, in the config file's nesting."""
    overrides: dict[str, Any] = {}
    listener = {
        key: value
        for key, value in (("port", args.port), ("bind_address", args.bind), ("ae_title", args.ae_title))
        if value is not None
    }
    if listener:
        overrides["listener"] = listener
    if args.destination:
        overrides["destinations"] = [_destination_flag(text) for text in args.destination]
    if args.allow:
        overrides["allowed_callers"] = [_allow_flag(text) for text in args.allow]
    if args.data_dir is not None:
        overrides["storage"] = {"data_dir": str(args.data_dir)}
    explain: dict[str, Any] = {}
    if args.methods:
        explain["methods"] = args.methods
    if args.outputs:
        explain["outputs"] = [kind.strip() for kind in args.outputs.split(",") if kind.strip()]
    if explain:
        overrides["explain"] = explain
    return overrides


def _destination_flag(text: str) -> dict[str, Any]:
    match = re.fullmatch(r"(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d+)", text)
    if match is None:
        raise FlagError(f"--destination {text!r}: expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", match["ae"])
    return {"name": name, "ae_title": match["ae"], "host": match["host"], "port": int(match["port"])}


def _allow_flag(text: str) -> dict[str, Any]:
    ae, _, host = text.partition("@")
    return {"ae_title": ae, "host": host or None}


def _serve(args: argparse.Namespace) -> int:

    try:
        config = load_config(args.config, overrides_from_flags(args))
    except (ConfigError, FlagError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, json_format=config.logging.json_format)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    receivers, workers = resolve_processes(config)
    if (receivers, workers) != (1, 1) or config.queue.redis_url:  # the queue runs in the processes
        try:  # the workers load the models; a wrong card or rule is one error here, not a restart loop
            compile_rules(config)
        except (ConfigError, ModelCardError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        supervisor = Supervisor(config, receivers, workers)
        supervisor.start()
        print(
            (
                f"pacs-xai listening as {config.listener.ae_title} on port {supervisor.port} "
                if receivers
                else "pacs-xai taking work from the queue (no DICOM listener) "
            )
            + f"({receivers} receiver and {workers} worker processes); Ctrl-C to stop",
            file=sys.stderr,
        )
        try:
            while not stop.wait(WATCH_SECONDS):
                supervisor.watch()
        finally:
            supervisor.stop()
        return 0
    try:
        node = Node(config)
    except (ConfigError, ModelCardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    node.start()
    print(f"pacs-xai listening as {config.listener.ae_title} on port {node.port}; Ctrl-C to stop", file=sys.stderr)
    stop.wait()
    node.stop()
    return 0


# --- send -----------------------------------------------------------------------------------


def _register_send(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    send = commands.add_parser(
        "send",
        help="send DICOM files to a node (C-STORE SCU)",
        formatter_class=formatter,
        description="Send files and folders to any DICOM node over one association, this one included.",
        epilog="examples:\n  pacs-xai send study/ --to PACSXAI@127.0.0.1:11112\n"
        "  pacs-xai send a.dcm b.dcm --to ORTHANC@127.0.0.1:4242 --aet MYSCU",
    )
    send.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders (recursive)")
    send.add_argument("--to", required=True, metavar="AE@HOST:PORT", help="the receiving node")
    send.add_argument("--aet", default="PACSXAI", metavar="AE", help="our calling AE title (default PACSXAI)")
    send.set_defaults(handler=_send)


def _send(args: argparse.Namespace) -> int:

    try:
        destination = Destination.parse(args.to)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = list(iter_files(args.paths))
    outcomes = StoreSCU(args.aet).send(destination, files)
    failed = [o for o in outcomes if o.verdict != "delivered"]
    for outcome in failed:
        print(f"error: {outcome.sop_instance_uid}: {outcome.verdict}: {outcome.detail}", file=sys.stderr)
    print(f"sent {len(outcomes) - len(failed)} of {len(files)} file(s) to {args.to}")
    return 1 if failed or len(outcomes) != len(files) else 0


# --- config ---------------------------------------------------------------------------------


def _register_config(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    config = commands.add_parser(
        "config",
        help="check a config file or print an example",
        formatter_class=formatter,
        description="Validate a node configuration without starting the node, or print a commented example.",
        epilog="examples:\n  pacs-xai config example > node.yaml\n  pacs-xai config check node.yaml",
    )
    sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = sub.add_parser(
        "check",
        help="validate a config file (its routing rules and model cards)",
        formatter_class=formatter,
        description="Validate the config, each routing rule (or, without routes, the model and explain sections), "
        "each model card a rule names (files and sha256) and every explainer's settings; each error names the rule "
        "(index and name) and the value. Then run the randomisation sanity check of each configured method on "
        "its model (once per model version and settings, remembered in ~/.cache/pacs-xai/randomisation) and warn "
        "when a method fails it.",
        epilog="examples:\n  pacs-xai config check node.yaml\n  pacs-xai config check node.yaml --skip-sanity-check",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument(
        "--skip-sanity-check",
        action="store_true",
        help="only validate; do not run the methods against randomised copies of the model",
    )
    check.set_defaults(handler=_config_check)
    example = sub.add_parser(
        "example",
        help="print a complete commented config",
        formatter_class=formatter,
        epilog="example:\n  pacs-xai config example > node.yaml",
    )
    example.set_defaults(handler=_config_example)


def _config_example(args: argparse.Namespace) -> int:

    print(example_config())
    return 0


def _config_check(args: argparse.Namespace) -> int:

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    check = check_rules(config)
    for warning in check.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if check.errors:
        for error in check.errors:
            print(f"error: {error}", file=sys.stderr)
        return 1
    destinations = ", ".join(f"{d.name}={d.ae_title}@{d.host}:{d.port}" for d in config.destinations) or "none"
    first = check.rules[0]
    print(
        f"OK: {args.file}: AE {config.listener.ae_title} on {config.listener.bind_address}:{config.listener.port}; "
        f"model {first.card.name} {first.card.version}; methods {', '.join(first.methods)}; "
        f"destinations {destinations}"
    )
    for checked in check.rules:
        rule = checked.rule
        sent_to = ", ".join(d.name for d in rule.destinations) or "none (outbox only)"
        print(
            f"  route {rule.index} {rule.name}{' (continue)' if rule.continue_ else ''}: "
            f"model {checked.card.name} {checked.card.version}; methods {', '.join(checked.methods)}; "
            f"outputs {', '.join(checked.outputs)}; destinations {sent_to}"
        )
    if not args.skip_sanity_check:
        done: set[tuple[Path, str, str]] = set()
        for checked in check.rules:
            for method in checked.methods:
                params = checked.rule.method_params.get(method, {})
                key = (checked.rule.card_path, method, repr(sorted(params.items())))
                if key not in done:
                    done.add(key)
                    _warn_when_insane(checked.rule.card_path, checked.card, method, dict(params))
    return 0


def _warn_when_insane(card_path: Path, card: ModelCard, method: str, params: dict) -> None:
    """The randomisation sanity check of ``method`` (cached); a warning on stderr when it fails."""
    print_progress(f"randomisation check of {method} on {card.name} {card.version} (once per model version) ...")
    try:
        verdict = randomisation_verdict(card_path, method, {**card_settings(card, method), **params})
    except (ModelCardError, ExplainerError, ValueError) as exc:
        print(f"note: randomisation check of {method} not run: {exc}", file=sys.stderr)
        return
    figures = (
        f"SSIM {verdict.ssim_after_head_and_last_block:.2f} to the trained model's maps once the head and the last "
        f"block are randomised, baseline {verdict.baseline_ssim:.2f}, {verdict.images} phantoms"
    )
    if verdict.passes:
        print(f"{method}: passes the randomisation check ({figures})")
    else:
        print(
            f"warning: {method} FAILS the randomisation sanity check on model {card.name} {card.version} ({figures}): "
            "its maps hardly depend on what the model learned, so they cannot show why it decided; choose another "
            "method (pacs-xai evaluate compares them; see docs/trust.md)",
            file=sys.stderr,
        )


# --- outbox ---------------------------------------------------------------------------------


def _register_outbox(commands: argparse._SubParsersAction, formatter: Callable) -> None:
    outbox = commands.add_parser(
        "outbox",
        help="show and act on results waiting to be sent",
        formatter_class=formatter,
        description="The outbox holds each result per destination: pending (waiting or retrying), "
        "dead (given up, with the reason) or sent.",
        epilog="examples:\n  pacs-xai outbox list --data-dir var\n  pacs-xai outbox retry --data-dir var\n"
        "  pacs-xai outbox purge --state sent --data-dir var",
    )
    sub = outbox.add_subparsers(dest="outbox_command", required=True, metavar="SUBCOMMAND")
    for name, handler, help_text in (
        ("list", _outbox_list, "list pending and dead results"),
        ("retry", _outbox_retry, "put dead results back to pending"),
        ("purge", _outbox_purge, "delete rows of a state (default: sent)"),
    ):
        command = sub.add_parser(
            name, help=help_text, formatter_class=formatter, epilog=f"example:\n  pacs-xai outbox {name} --data-dir var"
        )
        command.add_argument("--config", type=Path, metavar="FILE", help="node config (for its data folder)")
        command.add_argument("--data-dir", type=Path, metavar="DIR", help="the node's data folder (default ./var)")
        if name == "retry":
            command.add_argument("--uid", metavar="UID", help="only this result's SOP Instance UID")
        if name == "purge":
            command.add_argument(
                "--state",
                action="append",
                choices=("sent", "dead", "pending"),
                help="state to delete (repeatable; default sent)",
            )
        if name == "list":
            command.add_argument("--all", action="store_true", help="include sent results")
        command.set_defaults(handler=handler)


def _on_journal(action: Callable[[Any, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap an outbox action: open the node's journal (from --data-dir or --config), run, close."""

    def handler(args: argparse.Namespace) -> int:

        try:
            data_dir = args.data_dir if args.data_dir is not None else load_config(args.config).storage.data_dir
            path = Path(data_dir) / "journal.sqlite"
            if not path.is_file():
                raise ConfigError(f"no journal at {path}; give the node's --data-dir or --config")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        journal = Journal(path)
        try:
            return action(journal, args)
        finally:
            journal.close()

    return handler


@_on_journal
def _outbox_list(journal: Any, args: argparse.Namespace) -> int:
    states = ("pending", "dead", "sent") if args.all else ("pending", "dead")
    entries = journal.outbox.entries(states)
    print(f"{'state':8} {'attempts':>8}  {'destination':12} {'kind':14} {'method':12} sop instance uid / last error")
    for e in entries:
        print(f"{e.state:8} {e.attempts:>8}  {e.destination:12} {e.kind:14} {e.method:12} {e.sop_instance_uid}")
        if e.last_error:
            print(f"{'':46}{e.last_error}")
    print(f"{len(entries)} result(s)")
    return 0


@_on_journal
def _outbox_retry(journal: Any, args: argparse.Namespace) -> int:
    count = journal.outbox.retry_dead(args.uid)
    print(f"{count} dead result(s) back to pending; a running node sends them on its next pass")
    return 0


@_on_journal
def _outbox_purge(journal: Any, args: argparse.Namespace) -> int:
    count = journal.outbox.purge(tuple(args.state or ("sent",)))
    print(f"{count} row(s) purged")
    return 0
