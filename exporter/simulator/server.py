"""The simulated api.mailpartner.fr and api.smspartner.fr on one loopback socket, with fault
knobs and test controls.

Mail Partner answers under ``/v1`` (``url``) and SMS Partner under ``/smspartner/v1``
(``sms_url``), each ``bulk-status``, ``me`` and ``message-cancel``.  Each flavour has its own
world of sends (``world``, ``sms_world``), API key, fault knobs (``faults``, ``sms_faults``),
per-IP sliding-window rate limit and stats (``stats()``, ``sms_stats()``).

An API request goes through, in order: ``latency`` sleep, forced ``http_status`` (an
HTML page, as a proxy in front of the API would send), the per-IP rate limit, forced
``error_code``, then the real answer; ``invalid_body`` finally truncates whatever JSON or XML
body came out.  ``/sim/*`` control requests skip all of that and are not counted in stats:

- ``POST /sim/faults`` sets knobs from a JSON object, on both flavours, or only on one with
  ``"api": "mail"`` or ``"api": "sms"``; it answers that flavour's knobs (Mail Partner's when
  no ``api`` is given).
- ``POST /sim/send`` creates a send from ``{"recipients": N, "campaign"?, "sent_at"?,
  "messageId"?, "commercial"?, "scheduled_at"?}`` and answers ``{"messageId": ...}``; with
  ``"api": "sms"`` an SMS Partner one.
- ``GET /sim/stats`` answers Mail Partner's stats, ``GET /sim/stats?api=sms`` SMS Partner's.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from exporter.simulator.api import MailPartnerApi, PartnerApi, Query, Reply, error_reply
from exporter.simulator.control import MAIL, SMS, Faults, apply_faults, parse_api, parse_send
from exporter.simulator.formats import JSON_CONTENT_TYPE
from exporter.simulator.model import World
from exporter.simulator.sms import SmsPartnerApi, sms_world_beside
from exporter.simulator.traffic import SimulatorStats, SlidingWindowLimiter, TrafficRecorder

__all__ = ["Faults", "SimulatorServer", "SimulatorStats"]

SMS_PREFIX = "/smspartner"
# Path -> (flavour, endpoint name in stats).
_ROUTES = {
    "/v1/bulk-status": (MAIL, "bulk-status"),
    "/v1/me": (MAIL, "me"),
    "/v1/message-cancel": (MAIL, "message-cancel"),
    f"{SMS_PREFIX}/v1/bulk-status": (SMS, "bulk-status"),
    f"{SMS_PREFIX}/v1/me": (SMS, "me"),
    f"{SMS_PREFIX}/v1/message-cancel": (SMS, "message-cancel"),
}


def _html_reply(status: int) -> Reply:
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = str(status)
    body = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>\n"
    return Reply(status, "text/html; charset=utf-8", body.encode())


def _json_reply(status: int, payload: object) -> Reply:
    return Reply(status, JSON_CONTENT_TYPE, json.dumps(payload).encode())


@dataclasses.dataclass(frozen=True)
class _Flavour:
    """One upstream API on the socket, with its own rate limit and request bookkeeping."""

    api: PartnerApi
    limiter: SlidingWindowLimiter
    traffic: TrafficRecorder = dataclasses.field(default_factory=TrafficRecorder)

    def answer(
        self, endpoint: str, query: Query, faults: Faults, *, client: str, now: float
    ) -> Reply:
        """The rate limit, a forced error code, then the API's own answer."""
        if not self.limiter.admit(client, now):
            headers = {} if faults.retry_after is None else {"Retry-After": str(faults.retry_after)}
            status = 429 if faults.rate_limit_style == "http" else 200
            return error_reply(429, query, status=status, headers=headers)
        if faults.error_code is not None:
            return error_reply(faults.error_code, query)
        if endpoint == "me":
            return self.api.me(query, reject_key=faults.reject_key)
        if endpoint == "message-cancel":
            return self.api.message_cancel(query, reject_key=faults.reject_key)
        return self.api.bulk_status(query, reject_key=faults.reject_key)


class SimulatorServer:
    def __init__(
        self,
        world: World,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = "demo-key",
        rate_limit_per_minute: int = 2000,
        faults: Faults | None = None,
        sms_world: World | None = None,
        sms_api_key: str = "demo-sms-key",
    ) -> None:
        self.world = world
        self.sms_world = sms_world if sms_world is not None else sms_world_beside(world)
        self.faults = faults if faults is not None else Faults()
        # A copy: the knobs given here (the CLI's --latency) start out on both flavours.
        self.sms_faults = dataclasses.replace(self.faults)
        self._flavours = {
            MAIL: _Flavour(
                MailPartnerApi(world, api_key), SlidingWindowLimiter(rate_limit_per_minute)
            ),
            SMS: _Flavour(
                SmsPartnerApi(self.sms_world, sms_api_key),
                SlidingWindowLimiter(rate_limit_per_minute),
            ),
        }
        self._host = host
        # Bound now, so that `url` is known before `start()`.
        self._httpd = _HTTPServer((host, port), self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._httpd.server_port}/v1"

    @property
    def sms_url(self) -> str:
        return f"http://{self._host}:{self._httpd.server_port}{SMS_PREFIX}/v1"

    def start(self) -> SimulatorServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            # stop() waits up to one poll interval; tests start and stop dozens of servers.
            kwargs={"poll_interval": 0.05},
            name="mailpartner-simulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stats(self) -> SimulatorStats:
        """Mail Partner's ``/v1`` requests."""
        return self._flavours[MAIL].traffic.snapshot()

    def sms_stats(self) -> SimulatorStats:
        """SMS Partner's ``/smspartner/v1`` requests."""
        return self._flavours[SMS].traffic.snapshot()

    def faults_for(self, api: str) -> Faults:
        """The knobs of the flavour ``api`` (``"mail"`` or ``"sms"``)."""
        return self.sms_faults if api == SMS else self.faults

    def answer_v1(self, endpoint: str, query: Query, client: str, *, api: str = MAIL) -> Reply:
        flavour = self._flavours[api]
        faults = self.faults_for(api)
        now = flavour.api.world.clock()
        message_id = query.get("messageId") if endpoint == "bulk-status" else None
        with flavour.traffic.serving(endpoint, now, message_id):
            if faults.latency > 0:
                time.sleep(faults.latency)
            if faults.http_status is not None:
                return _html_reply(faults.http_status)
            reply = flavour.answer(endpoint, query, faults, client=client, now=now)
            if faults.invalid_body:
                return Reply(200, reply.content_type, reply.body[: len(reply.body) // 2])
            return reply

    def answer_control(
        self, method: str, path: str, body: bytes, query: Query | None = None
    ) -> Reply:
        try:
            if (method, path) == ("GET", "/sim/stats"):
                api = parse_api((query or {}).get("api")) or MAIL
                stats = self._flavours[api].traffic.snapshot()
                return _json_reply(200, dataclasses.asdict(stats))
            if (method, path) == ("POST", "/sim/faults"):
                knobs = apply_faults({MAIL: self.faults, SMS: self.sms_faults}, body)
                return _json_reply(200, dataclasses.asdict(knobs))
            if (method, path) == ("POST", "/sim/send"):
                api, recipients, options = parse_send(body)
                sent = self._flavours[api].api.world.send(recipients, **options)
                return _json_reply(200, {"messageId": sent.message_id})
        except ValueError as err:  # includes malformed JSON and a duplicate messageId
            return _json_reply(400, {"error": str(err)})
        return _json_reply(404, {"error": "not found"})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], simulator: SimulatorServer) -> None:
        self.simulator = simulator
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as requests.Session expects
    # Headers and body go out in two writes; with Nagle on, a keep-alive client waits ~40 ms
    # for the delayed ACK on every response.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: request lines carry the API key in their query string."""

    def do_GET(self) -> None:
        simulator = self.server.simulator
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        route = _ROUTES.get(url.path)
        if route is None:
            self._send(simulator.answer_control("GET", url.path, b"", query), simulator.faults)
            return
        api, endpoint = route
        reply = simulator.answer_v1(endpoint, query, self.client_address[0], api=api)
        self._send(reply, simulator.faults_for(api))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        simulator = self.server.simulator
        self._send(simulator.answer_control("POST", path, body), simulator.faults)

    def _send(self, reply: Reply, faults: Faults) -> None:
        compress = faults.gzip and "gzip" in self.headers.get("Accept-Encoding", "")
        body = gzip.compress(reply.body) if compress else reply.body
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(body)))
        if compress:
            self.send_header("Content-Encoding", "gzip")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
