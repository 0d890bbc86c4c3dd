"""HTTP side: a WSGI app factory (testable without a socket), and ``serve`` to run it on
``exporter.httpserver``.

With a web config (``--web.config.file``) the server adds TLS, basic auth and headers.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import hashlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIServer

import bcrypt
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from exporter.exposition import TextExposition
from exporter.httpserver import ThreadingServer, TLSServer
from exporter.landing import render_landing
from exporter.summary import SummaryReader
from exporter.tracker import MessageBook
from exporter.webconfig import WebConfigWatcher
from exporter.wsgi import StartResponse, WSGIApp, respond

log = logging.getLogger(__name__)
# What binding "::" fails with where the kernel has IPv6 off.
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})
_CHALLENGE = 'Basic realm="mailpartner-exporter"'
# What the fast path writes: the text format 0.0.4 and OpenMetrics 1.0.0 (what a Prometheus asks
# for); anything else prometheus_client negotiates (OpenMetrics 2.0) goes to its own writer.
_TEXT_0_0_4 = "text/plain; version=0.0.4"
_OPENMETRICS_1_0 = "application/openmetrics-text; version=1.0.0"
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
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

    ``book`` is the status page's messages (a callable: the one current at each request); its
    summary of the API, budget and credits comes from ``registry``.
    ``reload`` returns None on success or the errors that kept the old config. ``more``
    adds routes; one serves its path and everything under ``path/`` too. HEAD answers as GET
    does on every route, without the body.
    """
    metrics_app = _metrics_app(registry)
    summary = SummaryReader(registry, clock)  # what /metrics says, read in process

    def landing(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        messages = book() if callable(book) else book
        query = environ.get("QUERY_STRING", "")  # ?refresh=N: the page reloads itself
        page = render_landing(messages, telemetry_path, clock, summary(), query=query)
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
        if environ.get("REQUEST_METHOD") == "HEAD":
            return _head(route, environ, start_response)
        return route(environ, start_response)

    return app


def _head(route: WSGIApp, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    """The GET answer's status and headers, with the length of the body it leaves out."""
    answer: list[Any] = []
    written = 0

    def held(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        answer[:] = [status, headers, exc_info]

        def write(data: bytes) -> None:
            nonlocal written
            written += len(data)

        return write

    body = route({**environ, "REQUEST_METHOD": "GET"}, held)
    try:
        length = written + sum(map(len, body))
    finally:
        if hasattr(body, "close"):
            body.close()
    status, headers, exc_info = answer
    if not any(name.lower() == "content-length" for name, _ in headers):
        headers = [*headers, ("Content-Length", str(length))]
    start_response(status, headers, *([] if exc_info is None else [exc_info]))
    return []


def _metrics_app(registry: CollectorRegistry) -> WSGIApp:
    """Text format 0.0.4 or OpenMetrics, plain or gzip, from ``TextExposition`` (the bytes
    prometheus_client writes, faster); ``name[]`` filters and other methods from
    prometheus_client's own app, told plainly whether gzip is wanted (it reads no q-values)."""
    fallback: WSGIApp = make_wsgi_app(registry)
    exposition = TextExposition(registry)

    def metrics(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        _, content_type = choose_encoder(environ.get("HTTP_ACCEPT") or "")
        openmetrics = content_type.startswith(_OPENMETRICS_1_0)
        gzip = gzip_wanted(environ.get("HTTP_ACCEPT_ENCODING") or "")
        if (
            environ.get("REQUEST_METHOD") != "GET"
            or not (openmetrics or content_type.startswith(_TEXT_0_0_4))
            or "name[]" in parse_qs(environ.get("QUERY_STRING") or "")
        ):
            encoding = "gzip" if gzip else "identity"
            return fallback({**environ, "HTTP_ACCEPT_ENCODING": encoding}, start_response)
        headers = [("Content-Type", content_type)]
        if gzip:
            body = exposition.gzipped(openmetrics)
            headers.append(("Content-Encoding", "gzip"))
        else:
            body = exposition.plain(openmetrics)
        start_response("200 OK", [*headers, ("Content-Length", str(sum(map(len, body))))])
        return body

    return metrics


@functools.lru_cache(maxsize=64)  # scrapers send one or two spellings, over and over
def gzip_wanted(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` takes gzip, and likes it at least as much as no coding.

    Per RFC 9110: q=0 refuses a coding, ``*`` stands for every coding not named (``identity``
    among them), names are case-insensitive, ``x-gzip`` is gzip; a bad q-value refuses.
    """
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, *params = item.split(";")
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                value = value.strip()
                weight = float(value) if _QVALUE.fullmatch(value) else 0.0
        weights.setdefault(name.strip().lower(), weight)
    anything = weights.get("*", 0.0)
    gzip = weights.get("gzip", weights.get("x-gzip", anything))
    return gzip > 0 and gzip >= weights.get("identity", anything)


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
    idle_timeout: float = 10.0,
    max_connections: int = 256,
) -> WSGIServer:
    """Bind ``address`` and serve ``app`` in a daemon thread; ``shutdown()`` stops it.

    With ``web_config_path`` (exporter-toolkit's web-config.yml), TLS, basic auth and headers
    follow that file, re-read whenever it changes. A bad file at start raises ``ConfigErrors``.
    A client gets ``idle_timeout`` seconds to send each request (its TLS handshake included),
    and at most ``max_connections`` are served at once (see ``exporter.httpserver``).
    """
    host, port = parse_listen_address(address)
    server: ThreadingServer

    def plain(address: tuple[str, int], family: socket.AddressFamily) -> ThreadingServer:
        return ThreadingServer(address, family, idle_timeout, max_connections)

    if web_config_path is None:
        server = _bind(host, port, plain)
    else:
        watcher = WebConfigWatcher(web_config_path)
        app = _secured(app, watcher, BasicAuth())
        config = watcher.current()
        if config.tls is None:
            server = _bind(host, port, plain)
        else:
            current = watcher.current

            def tls(address: tuple[str, int], family: socket.AddressFamily) -> ThreadingServer:
                # The web config's context at each new connection: a reload applies at once.
                context = lambda: current().ssl_context  # noqa: E731 - a callable is asked for
                return TLSServer(address, family, idle_timeout, max_connections, context)

            server = _bind(host, port, tls)
        log.info("web config loaded", extra={"file": web_config_path, "tls": bool(config.tls)})
    server.set_app(app)
    # shutdown() waits for the loop to look: at most a tenth of a second on SIGTERM.
    threading.Thread(target=server.serve_forever, args=(0.1,), name="http", daemon=True).start()
    return server


def _bind(
    host: str,
    port: int,
    server: Callable[[tuple[str, int], socket.AddressFamily], ThreadingServer],
) -> ThreadingServer:
    """The server listening on ``host``; no host (``:10027``) is every interface, IPv6 and
    IPv4 alike, or IPv4 alone where the machine has no IPv6."""
    if host:
        return server((host, port), socket.AF_INET6 if ":" in host else socket.AF_INET)
    if socket.has_ipv6:
        try:
            return server(("::", port), socket.AF_INET6)
        except OSError as e:
            if e.errno not in _NO_IPV6:
                raise
            log.info("IPv6 is off: listening on IPv4 only", extra={"port": port})
    return server(("", port), socket.AF_INET)


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
