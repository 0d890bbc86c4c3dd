"""The HTTP/1.1 server under the WSGI app: a thread per connection, kept alive between requests,
and limits so that slow, idle or too many clients cannot keep a scrape out.

- A client has ``idle_timeout`` seconds from connecting (TLS handshake included), or from its
  previous answer, to send a whole request: line, headers and body. One that takes none of its
  answer for as long is dropped too.
- At most ``max_connections`` are served at once. A new one at the cap closes the one that has
  waited longest for a request; when every one is busy answering, new ones wait in the backlog.
- Out of file descriptors on accept, the server waits 0.1 s, doubling up to 1 s, instead of
  spinning on a listening socket that stays readable, and says so once a minute at most.
"""

from __future__ import annotations

import errno
import io
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import IO, TYPE_CHECKING, Any, cast
from wsgiref.handlers import format_date_time
from wsgiref.headers import Headers
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from exporter.connections import AcceptBackoff, Connection, Connections

if TYPE_CHECKING:
    from socketserver import _RequestType

    from _typeshed.wsgi import WSGIApplication

log = logging.getLogger(__name__)
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Four times the largest body a route takes (a message registration, 64 KiB): read whole
# before the app runs, so 256 connections hold 64 MiB at worst.
_MAX_BODY = 256 * 1024
_ROOM_WAIT = 0.1


class _Handler(WSGIRequestHandler):
    """Requests one after another on a connection, each with its body read before the app runs
    (so the idle timeout covers it and nothing unread is left on the connection)."""

    protocol_version = "HTTP/1.1"
    server: ThreadingServer

    def __init__(self, connection: Connection, address: Any, server: ThreadingServer) -> None:
        self.watched = connection
        super().__init__(connection.sock, address, server)

    def setup(self) -> None:
        self.connection = self.request
        # An answer goes out in several writes (status line, headers, body): without this,
        # Nagle's algorithm holds the last one back for the client's delayed ACK (40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = self.watched.reader()
        self.wfile = self.watched.writer()

    def handle(self) -> None:
        self.close_connection = True
        try:
            self.handle_one_request()
            while not self.close_connection:
                self.watched.expect_request()
                self.handle_one_request()
        except OSError:
            pass  # the client left, reset or broke TLS, or was dropped

    def handle_one_request(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return  # an error was sent
        if self.watched.ended:  # the headers were cut short: nothing to answer, nobody to read it
            self.close_connection = True
            return
        body = self._body()
        if body is None:
            return
        environ = self.get_environ()
        stdout = cast("IO[bytes]", self.wfile)
        handler = _ServerHandler(body, stdout, self.get_stderr(), environ, multithread=True)
        handler.request_handler = self
        if self.request_version != "HTTP/1.1":  # an HTTP/1.0 client: its version, one request
            handler.http_version = "1.0"
            self.close_connection = True
        handler.run(cast("WSGIApplication", self.server.get_app()))

    def _body(self) -> io.BytesIO | None:
        if "Transfer-Encoding" in self.headers:
            self.send_error(411, "Send the body with a Content-Length")
            return None
        lengths = self.headers.get_all("Content-Length") or ["0"]
        if len(lengths) > 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
            self.send_error(400, "Bad Content-Length")
            return None
        length = int(lengths[0])
        if length > _MAX_BODY:
            self.send_error(413)
            return None
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            return None
        return io.BytesIO(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Access logs are the reverse proxy's job."""


class _ServerHandler(ServerHandler):
    """wsgiref's answer writer, speaking HTTP/1.1: ``Connection: close`` when the connection
    ends after this answer, and never a body for HEAD, whatever the app returns."""

    http_version = "1.1"
    request_handler: _Handler
    # wsgiref's own, missing from its type stubs
    headers: Headers
    headers_sent: bool
    environ: dict[str, Any]
    status: str

    def cleanup_headers(self) -> None:
        super().cleanup_headers()
        if "Content-Length" not in self.headers:
            self.request_handler.close_connection = True  # only the close ends the body
        if self.request_handler.close_connection:
            self.headers["Connection"] = "close"

    def send_headers(self) -> None:
        """wsgiref's, in one write rather than four (status line, Date, Server, the rest)."""
        self.cleanup_headers()
        self.headers_sent = True
        if self.client_is_modern():
            self.headers.setdefault("Date", format_date_time(time.time()))
            self.headers.setdefault("Server", self.server_software or "")
            status = f"HTTP/{self.http_version} {self.status}\r\n".encode("iso-8859-1")
            self._write(status + bytes(self.headers))

    def write(self, data: bytes) -> None:
        if self.environ["REQUEST_METHOD"] != "HEAD":
            super().write(data)
        elif not self.headers_sent:
            self.bytes_sent = len(data)
            self.send_headers()

    def _write(self, data: bytes) -> None:
        try:
            super()._write(data)
        except OSError as e:
            # The client left or was dropped mid-answer: wsgiref then ends quietly, for the
            # errors it knows; ssl.SSLEOFError is not among them.
            self.request_handler.close_connection = True
            raise ConnectionAbortedError(*e.args) from e

    def handle_error(self) -> None:
        self.request_handler.close_connection = True
        super().handle_error()


class _Full(OSError):
    """Every connection is busy: socketserver takes an OSError from ``get_request`` as no
    request this round, and sweeps before the next."""


class ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per connection, so a slow client never holds up a scrape."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # connections beyond the cap wait here, not in SYN retries

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        idle_timeout: float,
        max_connections: int,
    ) -> None:
        self.address_family = family
        self.connections = Connections(max_connections, idle_timeout)
        self._backoff = AcceptBackoff()
        self._closing = threading.Event()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # "::" is every interface: IPv6 and, as Go's listeners do, IPv4 (mapped) too.
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        if not self.connections.make_room(_ROOM_WAIT):
            raise _Full("all connections busy")
        try:
            sock, address = super().get_request()
        except OSError as e:
            if e.errno in _OUT_OF_DESCRIPTORS:
                delay = self._backoff.failed(e, len(self.connections))
                # A client idle on a descriptor makes way for a new one; else wait for one.
                if not self.connections.free_descriptor(_ROOM_WAIT):
                    self._closing.wait(delay)
            raise
        self._backoff.succeeded()
        self.connections.add(sock)
        return sock, address

    def finish_request(self, request: _RequestType, client_address: Any) -> None:
        connection = (
            self.connections.serving(request) if isinstance(request, socket.socket) else None
        )
        if connection is not None:  # else dropped already
            self.serve_connection(connection, client_address)

    def serve_connection(self, connection: Connection, client_address: Any) -> None:
        _Handler(connection, client_address, self)

    def shutdown_request(self, request: _RequestType) -> None:
        if isinstance(request, socket.socket):
            connection = self.connections.find(request)
            super().shutdown_request(request if connection is None else connection.sock)
            self.connections.remove(request)  # once closed: a wait for a descriptor ends here

    def service_actions(self) -> None:
        super().service_actions()
        self.connections.sweep()

    def shutdown(self) -> None:
        self._closing.set()  # cuts an accept back-off short
        super().shutdown()

    def server_close(self) -> None:
        super().server_close()
        self.connections.drop_all()


class TLSServer(ThreadingServer):
    """TLS with the context ``context()`` gives at each connection (the current web config's).

    The handshake runs in the connection's own thread, and shares the request's idle timeout.
    """

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        idle_timeout: float,
        max_connections: int,
        context: Callable[[], ssl.SSLContext | None],
    ) -> None:
        self.context = context
        super().__init__(address, family, idle_timeout, max_connections)

    def setup_environ(self) -> None:
        super().setup_environ()
        self.base_environ["HTTPS"] = "on"

    def serve_connection(self, connection: Connection, client_address: Any) -> None:
        context = self.context()
        if context is None:
            return  # cannot happen: a reload cannot turn TLS off
        try:
            tls = context.wrap_socket(
                connection.sock, server_side=True, do_handshake_on_connect=False
            )
            connection.sock = tls
            connection.reading = True
            try:
                tls.do_handshake()
            finally:
                connection.reading = False
        except OSError as e:  # ssl.SSLError too
            log.debug("TLS handshake failed", extra={"client": client_address[0], "err": str(e)})
            return
        super().serve_connection(connection, client_address)
