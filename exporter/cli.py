"""Command line: ``parse_args`` reads the flags, ``main`` wires the pieces together."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from prometheus_client import generate_latest

from exporter import __version__
from exporter.app import (
    DEFAULT_CONFIG,
    Exporter,
    enabled_sources,
    load_runnable,
    tracking_fields,
)
from exporter.config.errors import ConfigErrors
from exporter.config.model import Config
from exporter.demo import Demo
from exporter.discovery import MessageFiles
from exporter.logs import LEVELS, setup_logging
from exporter.secret import Redactor
from exporter.shard import AUTO, ShardFlags
from exporter.signals import Background, Interrupted, StopSignals
from exporter.web import parse_listen_address
from exporter.webconfig import load_web_config

log = logging.getLogger("exporter")
DEFAULT_LISTEN = ":10027"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mailpartner-exporter",
        description="Prometheus exporter for Mail Partner bulk-status delivery reports.",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        default=DEFAULT_CONFIG,
        action=_Given,
        help="the YAML configuration (default: %(default)s; --demo runs without one)",
    )
    parser.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="validate the configuration without network, print every error, exit 0 or 1",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=DEFAULT_LISTEN,
        help="address to serve on (default: %(default)s)",
    )
    parser.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        default="/metrics",
        help="path of the metrics (default: %(default)s)",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=None,
        help="TLS and basic auth, in exporter-toolkit's web-config.yml format (default: none)",
    )
    parser.add_argument("--log.level", dest="log_level", choices=list(LEVELS), default="info")
    parser.add_argument(
        "--log.format", dest="log_format", choices=["logfmt", "json"], default="logfmt"
    )
    parser.add_argument(
        "--demo", action="store_true", help="start the embedded simulator on loopback and poll it"
    )
    parser.add_argument(
        "--web.enable-lifecycle",
        dest="enable_lifecycle",
        action="store_true",
        help="allow POST /-/reload (SIGHUP always reloads); on under --demo",
    )
    parser.add_argument(
        "--web.enable-registration",
        dest="enable_registration",
        action="store_true",
        help="allow POST and DELETE /api/v1/messages; on under --demo",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="poll every message once, print the exposition, exit (non-zero if any poll failed)",
    )
    # Strings, checked with the configuration: a bad value prints like a config error.
    parser.add_argument(
        "--shard.count",
        dest="shard_count",
        default=None,
        metavar="N",
        help="split the messages between N exporters by a hash of their ID (default: the"
        " config's shard.count, or 1)",
    )
    parser.add_argument(
        "--shard.index",
        dest="shard_index",
        default=None,
        metavar="I",
        help=f"poll only the messages of shard I (0 to N-1); {AUTO}: the number after the last -"
        " of $HOSTNAME, the ordinal of a StatefulSet pod (default: the config's shard.index,"
        " or 0)",
    )
    parser.add_argument(
        "--version", action="version", version=f"mailpartner-exporter {__version__}"
    )
    args = parser.parse_args(argv)
    try:
        parse_listen_address(args.listen_address)
    except ValueError as e:
        parser.error(str(e))
    if not args.telemetry_path.startswith("/") or args.telemetry_path == "/":
        parser.error("--web.telemetry-path must start with / and not be / itself")
    return args


class _Given(argparse.Action):
    """Stores the value, and that it was given: a default ``config.yaml`` may be missing
    under ``--demo``, a named one may not."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.config_given = True


def _config_path(args: argparse.Namespace) -> str | None:
    """``--config.file`` as given, or None for its default (see ``load_runnable``)."""
    return args.config_file if getattr(args, "config_given", False) else None


def main(argv: list[str] | None = None, *, received: Sequence[int] = ()) -> int:
    """The command line. SIGINT or SIGTERM at any moment ends it with 0 within seconds, no
    traceback: serving, as a shutdown (a second signal cuts that short); before that, or
    during ``--once``, at once, with one line saying what was interrupted. ``received``:
    signals that came before ``main`` (see ``StopSignals``)."""
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format, Redactor())
    with StopSignals(received) as signals:
        try:
            signals.arm()
            code = _main(args, signals)
            signals.disarm()  # done: a signal now is held, not raised on the way out
            return code
        except Interrupted as e:
            exporter, what = signals.exporter, f"interrupted during {signals.phase}"
            if exporter is not None:
                exporter.stop_now()
                what += "; state saved"
            log.info(what, extra={"signal": e.signal})
            return 0


def _main(args: argparse.Namespace, signals: StopSignals) -> int:
    shard_flags = ShardFlags(args.shard_count, args.shard_index)
    if args.config_check:
        signals.phase = "--config.check"
    try:
        config = load_runnable(_config_path(args), demo=args.demo, shard_flags=shard_flags)
    except ConfigErrors as e:
        for error in e.errors:
            print(error, file=sys.stderr)
        return 1
    if args.web_config_file is not None:
        try:
            load_web_config(args.web_config_file)
        except ConfigErrors as e:
            for error in e.errors:
                print(error, file=sys.stderr)
            return 1
    for warning in config.warnings:
        log.warning(warning)
    if args.config_check:
        return _config_check(config)
    demo = Demo() if args.demo else None
    try:
        if demo is not None:
            demo.start()
        return _run(config, args, demo, shard_flags, signals)
    finally:
        if demo is not None:
            demo.stop()


def _run(
    config: Config,
    args: argparse.Namespace,
    demo: Demo | None,
    flags: ShardFlags,
    signals: StopSignals,
) -> int:
    """Start the exporter, then poll once (``--once``) or serve until told to stop."""
    try:
        # From here on keys exist in memory: every log line is scrubbed of them.
        exporter = Exporter(
            config,
            _config_path(args),
            demo,
            on_secrets=lambda r: setup_logging(args.log_level, args.log_format, r),
            shard_flags=flags,
        )
    except ConfigErrors as e:  # a source plugin failed to start
        for error in e.errors:
            log.error("cannot start", extra={"err": str(error)})
        return 1
    signals.exporter = exporter
    if demo is not None:
        log.info(
            "demo mode: polling the embedded simulator",
            extra={"url": exporter.holder.config.api.base_url},
        )
    if args.once:
        signals.phase = "--once"
        ok = Background("once", exporter.poller.poll_all).result()
        exporter.save()
        sys.stdout.write(generate_latest(exporter.registry).decode())
        return 0 if ok else 1
    return _serve(exporter, args, signals)


def _config_check(config: Config) -> int:
    """``--config.check`` past the file itself: the message files' problems, or a summary."""
    files = _message_files(config)
    problems = files.snapshot().problems if files else ()
    for path, problem in problems:
        print(problem if problem.startswith(path) else f"{path}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(_check_summary(config, files))
    return 0


def _message_files(config: Config) -> MessageFiles | None:
    """The config's ``message_files``, read once, as the exporter would read them."""
    if not config.message_files:
        return None
    files = MessageFiles(config.message_files, os.path.dirname(os.path.abspath(config.file)))
    files.refresh()
    return files


def _check_summary(config: Config, files: MessageFiles | None = None) -> str:
    """``--config.check``'s line for a valid configuration: its messages and its files'."""
    listed = files.messages if files else ()
    # As the exporter merges them: an ID in the config and a file counts once.
    specs = tuple({spec.id: spec for spec in (*listed, *config.messages)}.values())
    summary = f"{config.file}: OK, {len(specs)} messages"
    if files is not None:
        summary += (
            f" ({len(config.messages)} in the config, {len(listed)} in"
            f" {files.snapshot().files} message files)"
        )
    if config.shard.sharded:
        owned = len(config.shard.select(specs))
        summary += f", {owned} in shard {config.shard_index} of 0..{config.shard_count - 1}"
    return summary + f", sources: {', '.join(s.name for s in enabled_sources(config))}"


def _serve(exporter: Exporter, args: argparse.Namespace, signals: StopSignals) -> int:
    try:
        server = exporter.serve(
            args.listen_address,
            args.telemetry_path,
            args.web_config_file,
            # The demo's README commands reload and register; the demo polls no real account.
            lifecycle=args.enable_lifecycle or args.demo,
            registration=args.enable_registration or args.demo,
        )
    except OSError as e:
        log.error("cannot listen", extra={"address": args.listen_address, "err": e.strerror})
        return 1
    except ConfigErrors as e:  # the web config changed since main() checked it
        for error in e.errors:
            log.error("bad web config", extra={"err": str(error)})
        return 1
    host, _ = parse_listen_address(args.listen_address)
    log.info(
        "listening",
        extra={
            "address": f"{host}:{server.server_port}",
            **tracking_fields(exporter.holder.config),
        },
    )
    signal.signal(signal.SIGHUP, lambda _signum, _frame: exporter.request_reload())
    signals.disarm()  # a signal waits until the exporter runs, not raised while it starts
    running = Background("exporter", lambda: exporter.run(server))
    signals.phase = "serving"
    try:
        signals.arm()
        return running.result()
    except Interrupted as e:
        log.info("shutting down", extra={"signal": e.signal})
        exporter.request_stop()
        signals.phase = "shutdown"
        signals.arm()  # a second signal cuts the shutdown short
        return running.result()
