"""``mailpartner-simulator``: serve a simulated api.mailpartner.fr, and api.smspartner.fr beside
it, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from types import FrameType

from exporter.calendar import describe_release
from exporter.simulator.control import Faults
from exporter.simulator.demo import DemoCampaign
from exporter.simulator.model import SimulatedSend, World
from exporter.simulator.server import SimulatorServer


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or "0.0.0.0", int(port)


def _positive(value: str) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {value!r}")
    return seconds


def _not_negative(value: str) -> float:
    seconds = _seconds(value)
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value!r}")
    return seconds


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, got {value!r}")
    return seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mailpartner-simulator",
        description=(
            "Serve a simulated Mail Partner API (bulk-status, me) for demos and tests,"
            " and SMS Partner's under /smspartner/v1."
        ),
    )
    parser.add_argument(
        "--listen", type=_address, default="127.0.0.1:10028", help="HOST:PORT to serve on"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the simulated world")
    parser.add_argument("--api-key", default="demo-key", help="the only API key accepted")
    parser.add_argument(
        "--sms-api-key", default="demo-sms-key", help="the only key SMS Partner's API accepts"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to answers")
    parser.add_argument("--rate-limit-per-minute", type=int, default=2000, help="per client IP")
    parser.add_argument(
        "--demo-sends",
        action="store_true",
        help=(
            "create sends of every age (IDs 1000 to 1005, then more), one made in the latest"
            " quiet hours, one deferred by 15 minutes and the last minute of transactional"
            " sends, then a new campaign every --send-interval and a transactional send every"
            " --transactional-interval; campaigns are commercial (held through quiet hours);"
            " all but 1000 to 1005 are forgotten 49 hours after they go out"
        ),
    )
    parser.add_argument(
        "--send-interval",
        type=_positive,
        default=180.0,
        help="seconds between new demo campaigns (each up to 2,000 recipients, 500 per send)",
    )
    parser.add_argument(
        "--transactional-interval",
        type=_not_negative,
        default=5.0,
        help=(
            "seconds between the demo's one-recipient transactional sends (campaign"
            " password-reset or invoice); 0 turns them off"
        ),
    )
    parser.add_argument(
        "--all-transactional",
        action="store_true",
        help=(
            "an account whose commercial restriction is lifted: commercial sends (the demo's"
            ' campaigns, POST /sim/send with "commercial": true) go out at once instead of'
            " being held from 20:00 to 08:00, weekends and French public holidays"
            " (Europe/Paris)"
        ),
    )
    return parser.parse_args(argv)


def describe(sent: SimulatedSend, now: float) -> str:
    """A send as the simulator prints it: ``message ID 1042 (promo, 500 recipients, held until
    Mon 08:00)``."""
    recipients = "1 recipient" if sent.recipients == 1 else f"{sent.recipients} recipients"
    parts = [sent.campaign, recipients]
    if sent.goes_out > now:
        deferred = sent.scheduled_at is not None
        parts.append(
            f"{'deferred' if deferred else 'held'} until {describe_release(sent.goes_out, now)}"
        )
    return f"message ID {sent.message_id} ({', '.join(parts)})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host, port = args.listen
    world = World(seed=args.seed, holds_commercial=not args.all_transactional)
    try:
        server = SimulatorServer(
            world,
            host=host,
            port=port,
            api_key=args.api_key,
            sms_api_key=args.sms_api_key,
            rate_limit_per_minute=args.rate_limit_per_minute,
            faults=Faults(latency=args.latency),
        )
    except OSError as err:
        print(f"mailpartner-simulator: cannot listen on {host}:{port}: {err}", file=sys.stderr)
        return 1
    campaign = (
        DemoCampaign(
            world,
            interval=args.send_interval,
            transactional_interval=args.transactional_interval,
        )
        if args.demo_sends
        else None
    )
    sends = campaign.start() if campaign else []

    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    with server:
        ids = " ".join(sent.message_id for sent in sends) or "none yet (POST /sim/send)"
        print(f"mailpartner-simulator listening on {server.url}; message IDs: {ids}", flush=True)
        print(
            f'SMS Partner API on {server.sms_url}; sends: POST /sim/send "api": "sms"', flush=True
        )
        while not stopping.wait(1.0):
            for sent in campaign.due() if campaign else []:
                print(f"new send: {describe(sent, world.clock())}", flush=True)
    return 0
