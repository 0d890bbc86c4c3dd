"""The HTTP server's limits, over real loopback sockets: the idle timeout, the connection cap,
running out of file descriptors; and HEAD and Accept-Encoding q-values on every route.

Timeouts here are half a second, caps eight connections: each test takes a second or two.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import logging
import os
import resource
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import bcrypt
import pytest
import requests
import trustme
import yaml
from prometheus_client.registry import CollectorRegistry

from exporter.app import Exporter, load_runnable
from exporter.config.model import PollingConfig
from exporter.connections import AcceptBackoff
from exporter.httpserver import ThreadingServer
from exporter.simulator import SimulatorServer, World
from exporter.tracker import MessageBook
from exporter.web import create_app, gzip_wanted, serve
from exporter.wsgi import WSGIApp, respond
from tests.conftest import TEST_KEY, FakeClock
from tests.scenario import scenario
from tests.stack import REPO, free_port, wait_until

IDLE = 0.5
# How late past its deadline a connection may be closed: the server sweeps every 0.1 s.
SLACK = 1.0
HALF_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"  # the blank line never comes


@contextlib.contextmanager
def served(
    app: WSGIApp | None = None, web_config: Path | None = None, **limits: Any
) -> Iterator[ThreadingServer]:
    if app is None:
        registry, book, clock = scenario()
        app = create_app(registry, book, clock=clock)
    server = serve(app, "127.0.0.1:0", None if web_config is None else str(web_config), **limits)
    assert isinstance(server, ThreadingServer)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def connect(server: ThreadingServer, sent: bytes = b"") -> socket.socket:
    client = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
    client.sendall(sent)
    return client


def started_since(threads: set[threading.Thread]) -> int:
    """How many threads alive now were not among ``threads``: the server's, for a connection."""
    return sum(thread not in threads for thread in threading.enumerate())


def closed_within(client: socket.socket, seconds: float) -> float | None:
    """How long until the server closed ``client`` without a word, or None if it did not."""
    start = time.monotonic()
    client.settimeout(seconds)
    try:
        data = client.recv(1024)
    except TimeoutError:
        return None
    except ConnectionResetError:  # closed with bytes of ours still unread
        data = b""
    assert data == b"", f"answered instead of dropped: {data[:80]!r}"
    return time.monotonic() - start


# --- idle timeout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        HALF_REQUEST,
        b"POST /-/healthy HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf",
    ],
    ids=["nothing", "half-headers", "half-body"],
)
def test_a_request_not_whole_within_the_idle_timeout_is_dropped_unanswered(sent: bytes) -> None:
    with served(idle_timeout=IDLE) as server, connect(server, sent) as client:
        assert closed_within(client, IDLE + SLACK) is not None


def test_the_idle_timeout_is_for_the_whole_request_not_for_each_byte() -> None:
    with served(idle_timeout=IDLE) as server, connect(server, b"GET / HTTP/1.1\r\n") as client:
        start = time.monotonic()
        while time.monotonic() - start < IDLE + SLACK:
            try:
                client.sendall(b"X: y\r\n")  # a header line every 50 ms: never 0.5 s of silence
            except ConnectionError:
                return  # closed, and said so by a reset
            if select.select([client], [], [], 0.05)[0]:
                assert closed_within(client, 0) is not None
                return
    pytest.fail("a trickling client was kept past the idle timeout")


def test_keep_alive_serves_the_next_request_then_drops_the_idle_connection() -> None:
    with served(idle_timeout=IDLE) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
        connection.request("GET", "/-/healthy")
        assert connection.getresponse().read() == b"Healthy\n"
        sock = connection.sock
        connection.request("GET", "/-/ready")
        assert connection.getresponse().read() == b"Ready\n"
        assert connection.sock is sock  # the same connection, kept alive
        assert sock is not None and closed_within(sock, IDLE + SLACK) is not None
        connection.close()


def test_tls_handshake_and_request_share_the_idle_timeout(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: server.pem\n  key_file: server.pem\n")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with served(web_config=config, idle_timeout=IDLE) as server, connect(server) as raw:
        start = time.monotonic()
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            # Handshake done, and no request: dropped once the budget since connecting is spent.
            tls.settimeout(IDLE + SLACK)
            assert tls.recv(1024) == b""
        assert time.monotonic() - start < IDLE + SLACK


def test_a_client_that_stops_taking_its_answer_is_dropped() -> None:
    chunk = bytes(2**20)

    def endless(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return (chunk for _ in range(64))  # 64 MiB: far more than the sockets buffer

    with served(endless, idle_timeout=IDLE) as server:
        threads = set(threading.enumerate())
        with connect(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") as client:
            wait_until(lambda: started_since(threads) == 1, 5, "answering")
            wait_until(lambda: started_since(threads) == 0, IDLE + SLACK, "dropped")
            received = b"".join(iter(lambda: client.recv(2**20), b""))
        assert len(received) < 64 * len(chunk)


# --- connection cap --------------------------------------------------------------------------


def test_at_the_cap_the_longest_idle_connection_makes_way_for_a_scrape() -> None:
    # The idle timeout is long: only the cap can free a slot within this test.
    with served(idle_timeout=60, max_connections=8) as server:
        threads = set(threading.enumerate())
        held = [connect(server, HALF_REQUEST) for _ in range(8)]
        wait_until(lambda: started_since(threads) == 8, 5, "8 connections served")
        response = requests.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5)
        assert response.status_code == 200 and "mailpartner_up" in response.text
        assert closed_within(held[0], 5) is not None  # the oldest made way
        held[-1].setblocking(False)
        with pytest.raises(BlockingIOError):
            held[-1].recv(1)  # the newest is still open, waiting for its request
        # 40 more: never more than 8 connections, nor their threads, at once
        held += [connect(server, HALF_REQUEST) for _ in range(40)]
        wait_until(lambda: closed_within(held[-9], 0.1) is not None, 5, "older ones dropped")
        wait_until(lambda: started_since(threads) <= 8, 5, "at most 8 threads")
        for client in held:
            client.close()


def test_when_every_connection_is_busy_new_ones_wait_to_be_accepted() -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        entered.set()
        release.wait(5)
        return respond(start_response, "200 OK", "done\n")

    with served(slow, idle_timeout=IDLE, max_connections=1) as server:
        threads = set(threading.enumerate())
        busy = connect(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert entered.wait(5)
        waiting = connect(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        # Past the idle timeout, neither answered nor dropped, and no thread: in the backlog.
        assert not select.select([waiting], [], [], IDLE + 0.3)[0]
        assert started_since(threads) == 1
        release.set()
        for client in (busy, waiting):
            client.settimeout(5)
            assert client.recv(1024).startswith(b"HTTP/1.1 200 OK")
            client.close()


# --- out of file descriptors -----------------------------------------------------------------


def test_accept_back_off_doubles_to_a_second_and_logs_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    backoff = AcceptBackoff(clock)
    error = OSError(24, "Too many open files")
    with caplog.at_level(logging.WARNING, logger="exporter.connections"):
        delays = [backoff.failed(error, connections=3) for _ in range(6)]
        backoff.succeeded()
        delays.append(backoff.failed(error, connections=3))
        clock.advance(60)
        backoff.failed(error, connections=3)
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 0.1]
    lines = [r for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert [r.failures for r in lines] == [1, 7]  # type: ignore[attr-defined]
    assert lines[0].err == "Too many open files"  # type: ignore[attr-defined]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LIMIT = 64  # open files, for the exporter process


@pytest.mark.e2e
def test_out_of_file_descriptors_the_exporter_neither_spins_nor_stops_answering(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "exporter.log"
    command = [
        sys.executable,
        "-m",
        "exporter",
        "--demo",
        "--web.listen-address",
        f"127.0.0.1:{port}",
    ]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until(lambda: requests.get(f"{url}/-/ready", timeout=1).ok, 30, "exporter ready")
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
        held: list[socket.socket] = []
        for _ in range(LIMIT + 40):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=3))
            except TimeoutError:
                break  # the backlog is full: the server has stopped accepting
        descriptors = Path(f"/proc/{process.pid}/fd")
        wait_until(lambda: len(list(descriptors.iterdir())) >= LIMIT - 2, 10, "limit reached")
        before = cpu_seconds(process.pid)
        time.sleep(1.0)  # what the process does meanwhile is the measurement
        assert cpu_seconds(process.pid) - before < 0.3
        # An idle client makes way: a scrape gets a descriptor while the limit is reached.
        assert requests.get(f"{url}/metrics", timeout=5).status_code == 200
        for client in held:
            client.close()
        assert requests.get(f"{url}/metrics", timeout=5).status_code == 200
        lines = [line for line in log.read_text().splitlines() if "file descriptors" in line]
        assert len(lines) == 1 and 'err="Too many open files"' in lines[0]
    finally:
        process.terminate()
        process.wait(10)


# --- HEAD ------------------------------------------------------------------------------------


@pytest.fixture
def exporter_url(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[str, str]]:
    with SimulatorServer(World(seed=5, clock=clock), api_key=TEST_KEY) as upstream:
        message = upstream.world.send(20).message_id
        path = tmp_path / "config.yaml"
        api = {"base_url": upstream.url, "api_key": TEST_KEY}
        messages = [{"id": message, "labels": {"campaign": "head"}}]
        document = {"api": api, "state": {"path": ":memory:"}, "messages": messages}
        path.write_text(yaml.safe_dump(document))
        exporter = Exporter(load_runnable(str(path), demo=False), str(path), clock=clock)
        server = exporter.serve("127.0.0.1:0", "/metrics")
        try:
            yield f"127.0.0.1:{server.server_port}", message
        finally:
            server.shutdown()
            server.server_close()


def test_head_answers_as_get_without_the_body_on_every_route(
    exporter_url: tuple[str, str],
) -> None:
    address, message = exporter_url
    connection = http.client.HTTPConnection(address, timeout=10)
    connection.connect()
    sock = connection.sock
    for path in (
        "/metrics",
        "/",
        "/-/healthy",
        "/-/ready",
        f"/probe?message_id={message}",
        "/api/v1/messages",
    ):
        connection.request("HEAD", path)
        head = connection.getresponse()
        assert head.read() == b""
        connection.request("GET", path)
        get = connection.getresponse()
        body = get.read()
        assert (head.status, without_date(head.getheaders())) == (
            get.status,
            without_date(get.getheaders()),
        ), path
        assert int(head.headers["Content-Length"]) == len(body) > 0, path
        assert connection.sock is sock, f"{path}: the connection was not kept alive"
    connection.close()


def without_date(headers: list[tuple[str, str]]) -> dict[str, str]:
    return {name: value for name, value in headers if name != "Date"}


def test_head_refused_by_basic_auth_has_no_body_and_keeps_the_connection(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    with served(web_config=config) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
        connection.request("HEAD", "/metrics")
        sock = connection.sock
        refused = connection.getresponse()
        assert (refused.status, refused.read()) == (401, b"")
        assert refused.headers["Content-Length"] == str(len("Unauthorized\n"))
        assert not refused.will_close and connection.sock is sock
        connection.request(
            "GET", "/-/healthy", headers={"Authorization": "Basic cHJvbWV0aGV1czpwdw=="}
        )
        assert connection.getresponse().read() == b"Healthy\n"
        connection.close()


# --- Accept-Encoding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept_encoding", "wanted"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("GZip;Q=1.0", True),
        ("x-gzip", True),
        ("*", True),
        ("deflate, gzip;q=0.8", True),
        ("identity;q=0, gzip;q=0.1", True),
        ("*;q=0.5, gzip;q=0.5", True),
        ("", False),
        ("deflate, br", False),
        ("identity", False),
        ("gzip;q=0", False),
        ("gzip ; q=0.000", False),
        ("gzip;q=0, *", False),
        ("*;q=0", False),
        ("*, gzip;q=0", False),
        ("gzip;q=0.5, identity", False),
        ("gzip;q=2", False),  # not a q-value: refused rather than guessed
        ("gzip;q=nan", False),
    ],
)
def test_gzip_is_sent_as_the_q_values_ask(accept_encoding: str, wanted: bool) -> None:
    assert gzip_wanted(accept_encoding) is wanted


def get_metrics(app: WSGIApp, accept: str, accept_encoding: str) -> tuple[dict[str, str], bytes]:
    environ: dict[str, Any] = {
        "PATH_INFO": "/metrics",
        "HTTP_ACCEPT": accept,
        "HTTP_ACCEPT_ENCODING": accept_encoding,
        "wsgi.input": BytesIO(),
    }
    setup_testing_defaults(environ)
    answer: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer.update(headers)

    return answer, b"".join(app(environ, start_response))


# The text format Prometheus asks for is written the fast way; a newer one by prometheus_client.
@pytest.mark.parametrize("accept", ["", "text/plain; version=1.0.0"], ids=["fast", "fallback"])
def test_q_zero_gets_the_plain_exposition_on_either_path(accept: str) -> None:
    registry, book, clock = scenario()
    app = create_app(registry, book, clock=clock)
    headers, body = get_metrics(app, accept, "gzip;q=0")
    assert "Content-Encoding" not in headers and b"mailpartner_up" in body
    headers, packed = get_metrics(app, accept, "identity;q=0.5, gzip")
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(packed) == body


def test_no_host_listens_on_ipv4_and_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    """``:PORT`` serves both families, as Go exporters do; IPv4 alone where IPv6 is off."""
    app = create_app(CollectorRegistry(), MessageBook(PollingConfig()))
    server = serve(app, ":0")
    try:
        port = server.server_port
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.create_connection((host, port), timeout=5) as client:
                assert client.family == family
                client.sendall(b"GET /-/healthy HTTP/1.0\r\n\r\n")
                assert client.recv(64).startswith(b"HTTP/1.0 200")
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setattr(socket, "has_ipv6", False)
    server = serve(app, ":0")
    try:
        assert server.address_family == socket.AF_INET
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=5):
            pass
    finally:
        server.shutdown()
        server.server_close()
