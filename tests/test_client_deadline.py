"""``api.timeout`` on the wall clock, shutdown cutting requests off, and ``/v1/me``'s size cap,
against real loopback upstreams that trickle, redirect or inflate.

A trickling upstream sends a byte every ``pace`` seconds, well within the per-read timeout:
only a deadline on the whole request ends it.
"""

from __future__ import annotations

import gzip
import logging
import select
import signal
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import trustme
import yaml
from prometheus_client import generate_latest

from exporter.aggregate import ReportAggregator
from exporter.app import Exporter, load_runnable
from exporter.client import (
    BULK_STATUS,
    ME,
    MailPartnerClient,
    PollError,
    RequestAborted,
    TransportError,
)
from exporter.domain import StatusMap
from exporter.secret import Redactor
from exporter.stats import RequestStats
from exporter.upstream import Upstream
from tests.conftest import TEST_KEY, CraftedServer, make_client, make_config
from tests.stack import start_exporter, wait_until

# The deadline most tests give (three times their upstream's pace), and how long past its
# deadline a request may take to end.
DEADLINE = 0.3
MARGIN = 0.5
# A bulk-status answer; the spaces make it long enough to trickle for a good while.
BODY = b'{"success": true, "code": 200, "StatutResponseList": []' + b" " * 200 + b"}"
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
    + BODY
)
# The start of a TLS server hello that announces 16 KiB: a handshake to trickle.
HANDSHAKE = b"\x16\x03\x03\x40\x00" + bytes(16384)


class Trickler:
    """An upstream on loopback that answers one byte every ``pace`` seconds, from the status
    line on (``part="head"``) or once the headers are sent (``part="body"``). A request for
    message ``quick`` is answered at once, and the connection kept alive. It notes when each
    trickled request came in and when its client hung up. Over TLS with ``tls``; or, with
    ``part="handshake"``, a TLS server hello that trickles without end."""

    def __init__(self, part: str, pace: float, tls: ssl.SSLContext | None = None) -> None:
        self._part = part
        self._start = 0 if part == "head" else ANSWER.index(b"\r\n\r\n") + 4
        self._pace = pace
        self._tls = tls
        self.connections = 0
        self.arrived: list[float] = []
        self.hung_up: list[float] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls or part == "handshake" else "http"
        self.url = f"{scheme}://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def durations(self) -> list[float]:
        return [end - start for start, end in zip(self.arrived, self.hung_up, strict=True)]

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        if self._part == "handshake":
            with connection:
                connection.recv(4096)  # the client hello
                return self._trickle(connection, HANDSHAKE, 0)
        if self._tls is not None:
            connection = self._tls.wrap_socket(connection, server_side=True)
        with connection:
            pending = b""
            while True:
                while b"\r\n\r\n" not in pending:
                    data = connection.recv(4096)
                    if not data:
                        return
                    pending += data
                head, _, pending = pending.partition(b"\r\n\r\n")
                if b"messageId=quick" not in head.split(b"\r\n")[0]:
                    return self._trickle(connection, ANSWER, self._start)
                connection.sendall(ANSWER)

    def _trickle(self, connection: socket.socket, data: bytes, start: int) -> None:
        """Send ``data``, at once up to ``start``, then byte by byte until the client goes."""
        self.arrived.append(time.monotonic())
        connection.sendall(data[:start])
        for at in range(start, len(data)):
            # Readable: the client shut its socket (or sent more, which it does not).
            if select.select([connection], [], [], self._pace)[0]:
                break
            try:
                connection.sendall(data[at : at + 1])
            except OSError:
                break
        self.hung_up.append(time.monotonic())


@pytest.fixture
def trickler() -> Iterator[Callable[..., Trickler]]:
    servers: list[Trickler] = []

    def start(part: str = "head", pace: float = 0.1, tls: ssl.SSLContext | None = None) -> Trickler:
        servers.append(Trickler(part, pace, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def aggregator() -> ReportAggregator:
    return ReportAggregator(StatusMap.default())


def call(client: MailPartnerClient, endpoint: str, timeout: float | None = None) -> object:
    if endpoint == ME:
        return client.get_json(ME)
    return client.bulk_status("1", aggregator(), timeout=timeout)


def timed_out(
    client: MailPartnerClient, endpoint: str = BULK_STATUS, timeout: float | None = None
) -> tuple[PollError, float]:
    """The error a request ended in, and how long it took."""
    started = time.monotonic()
    with pytest.raises(PollError) as caught:
        call(client, endpoint, timeout)
    return caught.value, time.monotonic() - started


@pytest.mark.parametrize("endpoint", [BULK_STATUS, ME])
@pytest.mark.parametrize("part", ["head", "body"])
def test_a_trickling_answer_ends_at_the_deadline(
    trickler: Callable[..., Trickler], part: str, endpoint: str
) -> None:
    upstream = trickler(part)
    stats = RequestStats([BULK_STATUS, ME])
    client = make_client(make_config(upstream.url, timeout=DEADLINE), stats)
    error, took = timed_out(client, endpoint)
    assert (error.label, str(error)) == ("timeout", f"timeout: no answer within {DEADLINE}s")
    assert DEADLINE <= took < DEADLINE + MARGIN
    assert stats.snapshot().failures[(endpoint, "timeout")] == 1
    wait_until(lambda: upstream.hung_up, MARGIN, "the upstream sees the client go")
    assert upstream.durations()[0] < DEADLINE + MARGIN


def test_a_probe_s_shorter_timeout_is_its_deadline(trickler: Callable[..., Trickler]) -> None:
    upstream = trickler("head")
    client = make_client(make_config(upstream.url, timeout=30))
    error, took = timed_out(client, timeout=DEADLINE)
    assert str(error) == f"timeout: no answer within {DEADLINE}s"
    assert took < DEADLINE + MARGIN


def test_a_kept_alive_connection_is_watched_and_not_reused_once_cut(
    trickler: Callable[..., Trickler],
) -> None:
    upstream = trickler("body")
    client = make_client(make_config(upstream.url, timeout=DEADLINE))
    client.bulk_status("quick", aggregator())
    error, took = timed_out(client)  # on the connection the first request left open
    assert upstream.connections == 1
    assert error.label == "timeout" and took < DEADLINE + MARGIN
    client.bulk_status("quick", aggregator())  # on a new one: the cut one was shut
    assert upstream.connections == 2


@pytest.mark.parametrize("part", ["head", "body"])
def test_the_deadline_holds_over_tls(
    trickler: Callable[..., Trickler], tmp_path: Path, part: str
) -> None:
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    upstream = trickler(part, tls=tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would win over verify
    session.verify = str(tmp_path / "ca.pem")
    config = make_config(upstream.url, timeout=DEADLINE)
    stats = RequestStats([BULK_STATUS])
    client = MailPartnerClient(config.api, session, stats, Redactor(config.api.api_key))
    client.bulk_status("quick", aggregator())
    error, took = timed_out(client)  # on the same TLS connection
    assert error.label == "timeout" and took < DEADLINE + MARGIN
    client.bulk_status("quick", aggregator())
    assert upstream.connections == 2


def test_a_trickled_tls_handshake_ends_at_the_deadline(
    trickler: Callable[..., Trickler],
) -> None:
    upstream = trickler("handshake")
    error, took = timed_out(make_client(make_config(upstream.url, timeout=DEADLINE)))
    assert (error.label, str(error)) == ("timeout", f"timeout: no answer within {DEADLINE}s")
    assert took < DEADLINE + MARGIN


def test_the_deadline_holds_through_an_http_proxy(trickler: Callable[..., Trickler]) -> None:
    proxy = trickler("head")
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"http": proxy.url.removesuffix("/v1")}
    config = make_config("http://api.mailpartner.invalid/v1", timeout=DEADLINE)
    stats = RequestStats([BULK_STATUS])
    client = MailPartnerClient(config.api, session, stats, Redactor(config.api.api_key))
    error, took = timed_out(client)
    assert error.label == "timeout" and took < DEADLINE + MARGIN
    assert proxy.arrived  # it did go through the proxy


def test_redirects_are_not_followed(
    crafted: Callable[[Callable[[str], CraftedServer.Reply]], CraftedServer],
) -> None:
    # Back to the same URL, key and all: followed, it would loop.
    server = crafted(lambda path: (302, {"Location": path, "Content-Length": "0"}, []))
    error, _ = timed_out(make_client(make_config(server.url)))
    assert (error.label, str(error)) == ("http_302", "http_302: HTTP 302")
    assert len(server.paths) == 1


def test_abort_cuts_off_requests_in_flight_and_refuses_new_ones(
    trickler: Callable[..., Trickler],
) -> None:
    upstream = trickler("head")
    stats = RequestStats([BULK_STATUS])
    client = make_client(make_config(upstream.url, timeout=30), stats)
    ended: list[BaseException] = []

    def poll() -> None:
        try:
            client.bulk_status("1", aggregator())
        except BaseException as e:  # RequestAborted is one, as CancelledError is
            ended.append(e)

    polls = [threading.Thread(target=poll) for _ in range(3)]
    for thread in polls:
        thread.start()
    wait_until(lambda: len(upstream.arrived) == 3, 5, "three requests in flight")
    aborted = time.monotonic()
    client.abort()
    for thread in polls:
        thread.join(MARGIN)
    assert time.monotonic() - aborted < MARGIN
    assert [type(e) for e in ended] == [RequestAborted] * 3
    with pytest.raises(RequestAborted):
        client.bulk_status("1", aggregator())
    assert len(upstream.arrived) == 3  # never sent
    # Neither failures nor errors of the upstream.
    snapshot = stats.snapshot()
    assert sum(snapshot.failures.values()) == sum(snapshot.errors.values()) == 0


def test_an_upstream_aborts_the_client_a_reload_replaced(
    trickler: Callable[..., Trickler],
) -> None:
    upstream = trickler("head")
    config = make_config(upstream.url, timeout=30)
    replaced = make_client(config)
    api = Upstream(config.api, replaced, replaced.stats, time.time())
    ended: list[BaseException] = []

    def poll() -> None:
        try:
            replaced.bulk_status("1", aggregator())
        except BaseException as e:
            ended.append(e)

    thread = threading.Thread(target=poll)
    thread.start()
    wait_until(lambda: upstream.arrived, 5, "a request in flight")
    api.reconfigure(config.api, make_client(config), time.time())
    api.abort()
    thread.join(MARGIN)
    assert [type(e) for e in ended] == [RequestAborted]
    with pytest.raises(RequestAborted):
        api.client.get_json(ME)


def test_me_refuses_a_gzip_bomb_without_inflating_it(
    crafted: Callable[[Callable[[str], CraftedServer.Reply]], CraftedServer],
) -> None:
    # gzip members one after the other are one gzip stream: 64 MiB of zeros in 64 KiB.
    bomb = gzip.compress(bytes(1 << 20)) * 64
    headers = {"Content-Encoding": "gzip", "Content-Length": str(len(bomb))}
    server = crafted(lambda path: (200, headers, [bomb]))
    client = make_client(make_config(server.url))
    tracemalloc.start()
    try:
        with pytest.raises(TransportError) as caught:
            client.get_json(ME)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(caught.value) == "invalid_response: response body larger than 1048576 bytes"
    assert peak < 8 << 20


def write_config(path: Path, url: str, timeout: str) -> Path:
    document = {
        "api": {"base_url": url, "api_key": TEST_KEY, "timeout": timeout, "concurrency": 8},
        "messages": [{"id": str(1000 + i)} for i in range(8)],
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_eight_trickling_polls_end_at_the_timeout_and_say_so(
    trickler: Callable[..., Trickler], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = trickler("head", pace=0.5)
    path = write_config(tmp_path / "config.yaml", upstream.url, "2s")
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    caplog.set_level(logging.WARNING, logger="exporter")
    exporter.poller.run_pending()
    assert exporter.poller.drain(2 + 2 * MARGIN)
    assert len(upstream.arrived) == 8
    wait_until(lambda: len(upstream.hung_up) == 8, MARGIN, "the upstream sees them all go")
    # As the upstream sees them (from the request's last byte, after connecting): 2 s each.
    assert all(1.9 < took < 2 + MARGIN for took in upstream.durations())
    exposition = generate_latest(exporter.registry).decode()
    for line in (
        'mailpartner_api_request_failures_total{endpoint="bulk-status",reason="timeout"} 8.0',
        'mailpartner_api_request_duration_seconds_bucket{endpoint="bulk-status",le="1.0"} 0.0',
        'mailpartner_api_request_duration_seconds_bucket{endpoint="bulk-status",le="2.5"} 8.0',
    ):
        assert line in exposition.splitlines()
    failed = [r for r in caplog.records if r.getMessage() == "poll failed"]
    assert [r.__dict__["err"] for r in failed] == ["timeout: no answer within 2s"] * 8
    for source in exporter.sources.values():
        source.close()


@pytest.mark.e2e
def test_sigterm_exits_within_5_s_with_eight_trickling_requests_in_flight(
    trickler: Callable[..., Trickler], tmp_path: Path
) -> None:
    upstream = trickler("head", pace=0.5)
    path = write_config(tmp_path / "config.yaml", upstream.url, "60s")
    exporter = start_exporter(tmp_path, "--config.file", str(path))
    try:
        wait_until(lambda: len(upstream.arrived) == 8, 10, "eight requests in flight")
        exporter.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = exporter.process.wait(10)
        took = time.monotonic() - signalled
    finally:
        exporter.stop()
    assert (code, took < 5) == (0, True), took
    wait_until(lambda: len(upstream.hung_up) == 8, MARGIN, "the upstream sees them all go")
    log = exporter.log.read_text()
    assert "shutting down" in log and "cutting off the requests still in flight" in log
    # Cut off, the polls are no failures: no line per message, no traceback.
    assert "poll failed" not in log and "Traceback" not in log and TEST_KEY not in log
