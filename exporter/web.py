"""HTTP side: a WSGI app factory (testable without a socket) and a threaded server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from exporter.landing import render_landing
from exporter.tracker import MessageBook

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def create_app(
    registry: CollectorRegistry,
    book: MessageBook,
    *,
    telemetry_path: str = "/metrics",
    ready: Callable[[], bool] = lambda: True,
    clock: Callable[[], float] = time.time,
) -> WSGIApp:
    """The exporter's routes: telemetry, landing page, health and readiness."""
    metrics_app = make_wsgi_app(registry)  # gzip, OpenMetrics negotiation, name[] filters

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == telemetry_path:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/":
            return _respond(
                start_response,
                "200 OK",
                render_landing(book, telemetry_path, clock),
                "text/html; charset=utf-8",
            )
        if path == "/-/healthy":
            return _respond(start_response, "200 OK", "Healthy\n")
        if path == "/-/ready":
            if ready():
                return _respond(start_response, "200 OK", "Ready\n")
            return _respond(start_response, "503 Service Unavailable", "Not ready\n")
        return _respond(start_response, "404 Not Found", "Not found\n")

    return app


def _respond(
    start_response: StartResponse,
    status: str,
    body: str,
    content_type: str = "text/plain; charset=utf-8",
) -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return [data]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per connection, so a slow client never holds up a scrape."""

    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Access logs are the reverse proxy's job."""


def parse_listen_address(address: str) -> tuple[str, int]:
    """``:10027``, ``127.0.0.1:10027`` or ``[::1]:10027`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address {address!r} is not host:port (e.g. :10027)")
    return host.strip("[]"), int(port)


def serve(app: WSGIApp, address: str) -> WSGIServer:
    """Bind ``address`` and serve ``app`` in a daemon thread; ``shutdown()`` stops it."""
    host, port = parse_listen_address(address)
    server_class: type[_ThreadingServer] = _ThreadingServer
    if ":" in host:
        server_class = type(
            "_ThreadingServerV6", (_ThreadingServer,), {"address_family": socket.AF_INET6}
        )
    server = make_server(host, port, app, server_class, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
