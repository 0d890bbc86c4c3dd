"""Command line: ``parse_args`` reads the flags, ``main`` wires the pieces together."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from types import FrameType

import requests
import requests.adapters
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.client import BULK_STATUS, MailPartnerClient
from exporter.collector import MailPartnerCollector
from exporter.config import API_KEY_ENV, Config, ConfigErrors, load_config
from exporter.config.holder import ConfigHolder
from exporter.demo import Demo
from exporter.logs import LEVELS, setup_logging
from exporter.poller import Poller
from exporter.secret import Redactor
from exporter.stats import RequestStats
from exporter.tracker import MessageBook
from exporter.web import create_app, parse_listen_address, serve

log = logging.getLogger("exporter")
DEFAULT_LISTEN = ":10027"
# How often --demo looks for the simulator's new sends.
_DEMO_SEND_CHECK = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mailpartner-exporter",
        description="Prometheus exporter for Mail Partner bulk-status delivery reports.",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        default="config.yaml",
        help="the YAML configuration (default: %(default)s)",
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
    parser.add_argument("--log.level", dest="log_level", choices=list(LEVELS), default="info")
    parser.add_argument(
        "--log.format", dest="log_format", choices=["logfmt", "json"], default="logfmt"
    )
    parser.add_argument(
        "--demo", action="store_true", help="start the embedded simulator on loopback and poll it"
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="poll every message once, print the exposition, exit (non-zero if any poll failed)",
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format, Redactor())
    try:
        config = load_config(args.config_file)
    except ConfigErrors as e:
        for error in e.errors:
            print(error, file=sys.stderr)
        return 1
    if config.api.api_key is None and not args.demo:
        print(
            f"{config.file}: api: no API key: set api.api_key_file, api.api_key or the "
            f"{API_KEY_ENV} environment variable",
            file=sys.stderr,
        )
        return 1
    for warning in config.warnings:
        log.warning(warning)
    if args.config_check:
        print(f"{config.file}: OK, {len(config.messages)} messages")
        return 0

    demo = Demo() if args.demo else None
    if demo is not None:
        config = demo.start(config)
        log.info("demo mode: polling the embedded simulator", extra={"url": config.api.base_url})
    # From here on the key exists in memory: every log line is scrubbed of it.
    setup_logging(args.log_level, args.log_format, Redactor(config.api.api_key))
    exporter = Exporter(config)
    try:
        if args.once:
            ok = exporter.poller.poll_all()
            sys.stdout.write(generate_latest(exporter.registry).decode())
            return 0 if ok else 1
        return exporter.serve(args, demo)
    finally:
        if demo is not None:
            demo.stop()


class Exporter:
    """The running pieces, built from one config: client → poller → book → collector."""

    def __init__(self, config: Config) -> None:
        now = time.time()
        self.holder = ConfigHolder(config, now)
        self.book = MessageBook(config.polling)
        self.book.sync(config.messages, now)
        self.stats = RequestStats([BULK_STATUS])
        session = requests.Session()
        session.headers["User-Agent"] = f"mailpartner-exporter/{__version__}"
        # One kept-alive connection per concurrent poll.
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=config.api.concurrency)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        client = MailPartnerClient(config.api, session, self.stats, Redactor(config.api.api_key))
        self.poller = Poller(config, self.book, client)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(MailPartnerCollector(self.book, self.stats, self.holder))

    def serve(self, args: argparse.Namespace, demo: Demo | None) -> int:
        app = create_app(self.registry, self.book, telemetry_path=args.telemetry_path)
        try:
            server = serve(app, args.listen_address)
        except OSError as e:
            log.error("cannot listen", extra={"address": args.listen_address, "err": e.strerror})
            return 1
        host, _ = parse_listen_address(args.listen_address)
        log.info(
            "listening",
            extra={
                "address": f"{host}:{server.server_port}",
                "messages": len(self.holder.config.messages),
            },
        )
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            stop.set()
            self.poller.wake()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        threading.Thread(target=self.poller.run, args=(stop,), name="poller", daemon=True).start()
        while not stop.wait(_DEMO_SEND_CHECK if demo else None):
            if demo is not None:
                for spec in demo.new_messages():
                    self.book.add(spec, time.time())
                    log.info("demo send", extra={"message_id": spec.id})
                self.poller.wake()
        server.shutdown()
        return 0
