"""HTTP side: a WSGI app factory (testable without a socket) and a threaded server.

With a web config (``--web.config.file``) the server adds TLS, basic auth and headers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import bcrypt
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from exporter.exposition import TextExposition
from exporter.landing import render_landing
from exporter.tracker import MessageBook
from exporter.webconfig import WebConfigWatcher
from exporter.wsgi import StartResponse, WSGIApp, respond

log = logging.getLogger(__name__)
_CHALLENGE = 'Basic realm="mailpartner-exporter"'
# What the fast path writes: the text format 0.0.4 and OpenMetrics 1.0.0 (what a Prometheus asks
# for); anything else prometheus_client negotiates (OpenMetrics 2.0) goes to its own writer.
_TEXT_0_0_4 = "text/plain; version=0.0.4"
_OPENMETRICS_1_0 = "application/openmetrics-text; version=1.0.0"
# bcrypt of a random password, checked for unknown users so they cost as much as known ones.
_DECOY_HASH = b"$2b$10$jb6mSkTEHB5QkYb71N19peyk2P9UGt2Ekak7ZPU5WsznWpA4.J.Tu"


def create_app(
    registry: CollectorRegistry,
    book: MessageBook | Callable[[], MessageBook],
    *,
    telemetry_path: str = "/metrics",
    ready: Callable[[], bool] = lambda: True,
    reload: Callable[[], str | None] | None = None,
    clock: Callable[[], float] = time.time,
    more: Mapping[str, WSGIApp] | None = None,
) -> WSGIApp:
    """The exporter's routes: telemetry, landing page, health, readiness and reload.

    ``book`` is the status page's messages (a callable: the one current at each request).
    ``reload`` returns None on success or the errors that kept the old config. ``more``
    adds routes; one serves its path and everything under ``path/`` too.
    """
    metrics_app = _metrics_app(registry)

    def landing(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        page = render_landing(book() if callable(book) else book, telemetry_path, clock)
        return respond(start_response, "200 OK", page, "text/html; charset=utf-8")

    def healthy(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return respond(start_response, "200 OK", "Healthy\n")

    def readiness(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if ready():
            return respond(start_response, "200 OK", "Ready\n")
        return respond(start_response, "503 Service Unavailable", "Not ready\n")

    def reloading(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST" or reload is None:
            return respond(start_response, "405 Method Not Allowed", "Only POST\n")
        error = reload()
        if error is None:
            return respond(start_response, "200 OK", "Reloaded\n")
        return respond(start_response, "500 Internal Server Error", error + "\n")

    routes: dict[str, WSGIApp] = {
        telemetry_path: metrics_app,
        "/": landing,
        "/-/healthy": healthy,
        "/-/ready": readiness,
    }
    if reload is not None:
        routes["/-/reload"] = reloading
    routes.update(more or {})
    subtrees = [(f"{path}/", route) for path, route in (more or {}).items()]

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        route = routes.get(path)
        if route is None:
            route = next((r for prefix, r in subtrees if path.startswith(prefix)), None)
        if route is None:
            return respond(start_response, "404 Not Found", "Not found\n")
        return route(environ, start_response)

    return app


def _metrics_app(registry: CollectorRegistry) -> WSGIApp:
    """Text format 0.0.4 or OpenMetrics, plain or gzip, from ``TextExposition`` (the bytes
    prometheus_client writes, faster); ``name[]`` filters and other methods from
    prometheus_client's own app."""
    fallback: WSGIApp = make_wsgi_app(registry)
    exposition = TextExposition(registry)

    def metrics(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        _, content_type = choose_encoder(environ.get("HTTP_ACCEPT") or "")
        openmetrics = content_type.startswith(_OPENMETRICS_1_0)
        if (
            environ.get("REQUEST_METHOD") != "GET"
            or not (openmetrics or content_type.startswith(_TEXT_0_0_4))
            or "name[]" in parse_qs(environ.get("QUERY_STRING") or "")
        ):
            return fallback(environ, start_response)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or ""):
            body = exposition.gzipped(openmetrics)
            headers.append(("Content-Encoding", "gzip"))
        else:
            body = exposition.plain(openmetrics)
        start_response("200 OK", [*headers, ("Content-Length", str(sum(map(len, body))))])
        return body

    return metrics


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per connection, so a slow client never holds up a scrape."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, _QuietHandler)


class _TLSServer(_ThreadingServer):
    """TLS with the current web config's context, new for every connection.

    The handshake runs in the connection's own thread, under a timeout, so a client that
    connects and never finishes it holds up nobody but itself.
    """

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        watcher: WebConfigWatcher,
        handshake_timeout: float,
    ) -> None:
        self.watcher = watcher
        self.handshake_timeout = handshake_timeout
        super().__init__(address, family)

    def setup_environ(self) -> None:
        super().setup_environ()
        self.base_environ["HTTPS"] = "on"

    def finish_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        context = self.watcher.current().ssl_context
        if context is None or not isinstance(request, socket.socket):
            return  # neither happens: a reload cannot turn TLS off, and this server is TCP
        request.settimeout(self.handshake_timeout)
        try:
            connection = context.wrap_socket(request, server_side=True)
        except OSError as e:  # ssl.SSLError and timeouts are OSErrors
            log.debug("TLS handshake failed", extra={"client": client_address[0], "err": str(e)})
            return
        connection.settimeout(None)
        try:
            super().finish_request(connection, client_address)
        finally:
            # wrap_socket took over the descriptor: the caller's own cleanup no longer can.
            self.shutdown_request(connection)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Access logs are the reverse proxy's job."""


def parse_listen_address(address: str) -> tuple[str, int]:
    """``:10027``, ``127.0.0.1:10027`` or ``[::1]:10027`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address {address!r} is not host:port (e.g. :10027)")
    return host.strip("[]"), int(port)


def serve(
    app: WSGIApp,
    address: str,
    web_config_path: str | None = None,
    *,
    handshake_timeout: float = 10.0,
) -> WSGIServer:
    """Bind ``address`` and serve ``app`` in a daemon thread; ``shutdown()`` stops it.

    With ``web_config_path`` (exporter-toolkit's web-config.yml), TLS, basic auth and headers
    follow that file, re-read whenever it changes. A bad file at start raises ``ConfigErrors``.
    """
    host, port = parse_listen_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server: _ThreadingServer
    if web_config_path is None:
        server = _ThreadingServer((host, port), family)
    else:
        watcher = WebConfigWatcher(web_config_path)
        app = _secured(app, watcher, BasicAuth())
        config = watcher.current()
        if config.tls is None:
            server = _ThreadingServer((host, port), family)
        else:
            server = _TLSServer((host, port), family, watcher, handshake_timeout)
        log.info("web config loaded", extra={"file": web_config_path, "tls": bool(config.tls)})
    server.set_app(app)
    # shutdown() waits for the loop to look: at most a tenth of a second on SIGTERM.
    threading.Thread(target=server.serve_forever, args=(0.1,), name="http", daemon=True).start()
    return server


def _secured(app: WSGIApp, watcher: WebConfigWatcher, auth: BasicAuth) -> WSGIApp:
    """Basic auth on every path, as exporter-toolkit does, plus the configured headers."""

    def secured(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        config = watcher.current()
        replaced = {name.lower() for name, _ in config.headers}

        def with_headers(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            kept = [(name, value) for name, value in headers if name.lower() not in replaced]
            return start_response(status, [*kept, *config.headers], *exc_info)

        users = config.basic_auth_users
        if users and not auth.allows(users, environ.get("HTTP_AUTHORIZATION")):
            challenge = [("WWW-Authenticate", _CHALLENGE)]
            return respond(with_headers, "401 Unauthorized", "Unauthorized\n", headers=challenge)
        return app(environ, with_headers)

    return secured


class BasicAuth:
    """``Authorization: Basic`` against bcrypt hashes, remembering the credentials that passed.

    The memory is keyed on the user, the stored hash and the SHA-256 of the password, so a
    scrape pays bcrypt once, and a changed hash in the web config forgets the old password.
    """

    def __init__(self, remember: int = 1024) -> None:
        self._remember = remember
        self._passed: set[tuple[str, bytes, bytes]] = set()
        # bcrypt is meant to be slow: one check at a time, as in exporter-toolkit.
        self._lock = threading.Lock()

    def allows(self, users: Mapping[str, bytes], authorization: str | None) -> bool:
        credentials = _basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed = users.get(user)
        key = (user, hashed or b"", hashlib.sha256(password).digest())
        if hashed is not None and key in self._passed:
            return True
        with self._lock:
            # bcrypt only reads 72 bytes (Go's and htpasswd's too); Python's bcrypt refuses more.
            ok = bcrypt.checkpw(password[:72], hashed or _DECOY_HASH) and hashed is not None
            if ok:
                if len(self._passed) >= self._remember:
                    self._passed.clear()
                self._passed.add(key)
        return ok


def _basic_credentials(authorization: str | None) -> tuple[str, bytes] | None:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user.decode("utf-8", "replace"), password) if colon else None
