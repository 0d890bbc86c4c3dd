"""The simulated api.mailpartner.fr on a loopback socket, with fault knobs and test controls.

A ``/v1`` request goes through, in order: ``latency`` sleep, forced ``http_status`` (an
HTML page, as a proxy in front of the API would send), the per-IP rate limit, forced
``error_code``, then the real answer; ``invalid_body`` finally truncates whatever JSON or XML
body came out.  ``/sim/*`` control requests skip all of that and are not counted in stats.
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

from exporter.simulator.api import Query, Reply, UpstreamApi, error_reply
from exporter.simulator.control import Faults, apply_faults, parse_send
from exporter.simulator.formats import JSON_CONTENT_TYPE
from exporter.simulator.model import World
from exporter.simulator.traffic import SimulatorStats, SlidingWindowLimiter, TrafficRecorder

__all__ = ["Faults", "SimulatorServer", "SimulatorStats"]

_V1_ENDPOINTS = {"/v1/bulk-status": "bulk-status", "/v1/me": "me"}


def _html_reply(status: int) -> Reply:
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = str(status)
    body = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>\n"
    return Reply(status, "text/html; charset=utf-8", body.encode())


def _json_reply(status: int, payload: object) -> Reply:
    return Reply(status, JSON_CONTENT_TYPE, json.dumps(payload).encode())


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
    ) -> None:
        self.world = world
        self.faults = faults if faults is not None else Faults()
        self._api = UpstreamApi(world, api_key)
        self._limiter = SlidingWindowLimiter(rate_limit_per_minute)
        self._traffic = TrafficRecorder()
        self._host = host
        # Bound now, so that `url` is known before `start()`.
        self._httpd = _HTTPServer((host, port), self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._httpd.server_port}/v1"

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
        return self._traffic.snapshot()

    def answer_v1(self, endpoint: str, query: Query, client: str) -> Reply:
        now = self.world.clock()
        message_id = query.get("messageId") if endpoint == "bulk-status" else None
        with self._traffic.serving(endpoint, now, message_id):
            faults = self.faults
            if faults.latency > 0:
                time.sleep(faults.latency)
            if faults.http_status is not None:
                return _html_reply(faults.http_status)
            reply = self._answer_api(endpoint, query, client, now)
            if faults.invalid_body:
                return Reply(200, reply.content_type, reply.body[: len(reply.body) // 2])
            return reply

    def answer_control(self, method: str, path: str, body: bytes) -> Reply:
        try:
            if (method, path) == ("GET", "/sim/stats"):
                return _json_reply(200, dataclasses.asdict(self.stats()))
            if (method, path) == ("POST", "/sim/faults"):
                apply_faults(self.faults, body)
                return _json_reply(200, dataclasses.asdict(self.faults))
            if (method, path) == ("POST", "/sim/send"):
                recipients, options = parse_send(body)
                sent = self.world.send(recipients, **options)
                return _json_reply(200, {"messageId": sent.message_id})
        except ValueError as err:  # includes malformed JSON and a duplicate messageId
            return _json_reply(400, {"error": str(err)})
        return _json_reply(404, {"error": "not found"})

    def _answer_api(self, endpoint: str, query: Query, client: str, now: float) -> Reply:
        faults = self.faults
        if not self._limiter.admit(client, now):
            headers = {} if faults.retry_after is None else {"Retry-After": str(faults.retry_after)}
            status = 429 if faults.rate_limit_style == "http" else 200
            return error_reply(429, query, status=status, headers=headers)
        if faults.error_code is not None:
            return error_reply(faults.error_code, query)
        if endpoint == "me":
            return self._api.me(query, reject_key=faults.reject_key)
        return self._api.bulk_status(query, reject_key=faults.reject_key)


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
        url = urlsplit(self.path)
        endpoint = _V1_ENDPOINTS.get(url.path)
        if endpoint is None:
            self._send(self.server.simulator.answer_control("GET", url.path, b""))
            return
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        self._send(self.server.simulator.answer_v1(endpoint, query, self.client_address[0]))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        self._send(self.server.simulator.answer_control("POST", path, body))

    def _send(self, reply: Reply) -> None:
        compress = self.server.simulator.faults.gzip and "gzip" in self.headers.get(
            "Accept-Encoding", ""
        )
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
