"""HTTP routes, through the WSGI app and over a real socket."""

from __future__ import annotations

import gzip
import re
import socket
import subprocess
from io import BytesIO
from types import MappingProxyType
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
import requests
from prometheus_client.registry import CollectorRegistry

from exporter.client import BULK_STATUS
from exporter.collector import MailPartnerCollector
from exporter.domain import MessageSpec
from exporter.stats import RequestStats
from exporter.tracker import MessageBook
from exporter.web import create_app, parse_listen_address
from tests.conftest import FakeClock, make_config, require_tool
from tests.scenario import scenario


def call(
    app: Any, path: str, headers: dict[str, str] | None = None
) -> tuple[str, dict[str, str], bytes]:
    path, _, query = path.partition("?")
    environ: dict[str, Any] = {"PATH_INFO": path, "QUERY_STRING": query, "wsgi.input": BytesIO()}
    setup_testing_defaults(environ)
    environ.update({f"HTTP_{k.upper().replace('-', '_')}": v for k, v in (headers or {}).items()})
    answer: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
        answer.update(status=status, headers=dict(response_headers))

    body = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], body


@pytest.fixture
def app() -> Any:
    registry, book, clock = scenario()
    return create_app(registry, book, clock=clock)


def test_health_readiness_and_unknown_paths(app: Any) -> None:
    assert call(app, "/-/healthy")[::2] == ("200 OK", b"Healthy\n")
    assert call(app, "/-/ready")[::2] == ("200 OK", b"Ready\n")
    assert call(app, "/nope")[0] == "404 Not Found"
    registry, book, _ = scenario()
    not_ready = create_app(registry, book, ready=lambda: False)
    assert call(not_ready, "/-/ready")[0] == "503 Service Unavailable"


def test_metrics_plain_gzip_and_openmetrics(app: Any) -> None:
    status, headers, body = call(app, "/metrics")
    assert status == "200 OK" and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert (
        b'mailpartner_message_recipients{campaign="newsletter",message_id="300",'
        b'state="delivered"} 2.0' in body
    )
    _, headers, packed = call(app, "/metrics", {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(packed) == body
    _, headers, om = call(
        app, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.endswith(b"# EOF\n")
    assert b'mailpartner_recipients_total{campaign="newsletter",state="delivered"} 2.0' in om
    assert b'mailpartner_delivery_delay_seconds_bucket{campaign="welcome",le="120.0"} 1.0' in om


def test_custom_telemetry_path() -> None:
    registry, book, _ = scenario()
    app = create_app(registry, book, telemetry_path="/probe-metrics")
    assert call(app, "/probe-metrics")[0] == "200 OK"
    assert call(app, "/metrics")[0] == "404 Not Found"
    assert b'href="/probe-metrics"' in call(app, "/")[2]


def test_landing_page_lists_messages_newest_first_with_counts_and_errors(app: Any) -> None:
    status, headers, body = call(app, "/")
    page = body.decode()
    assert status == "200 OK" and headers["Content-Type"] == "text/html; charset=utf-8"
    rows = [line for line in page.splitlines() if line.startswith("<tr data-message-id")]
    assert [row.split('"')[1] for row in rows] == ["301", "302", "300"]
    assert "<td>301</td><td>campaign=welcome, team=crm</td><td>active</td>" in rows[0]
    assert (
        '<td class="n" data-state="delivered">1</td><td class="n" data-state="failed">1</td>'
        '<td class="n" data-state="pending">1</td><td class="n" data-state="unknown">1</td>'
        '<td class="n">0.042</td>'
    ) in rows[0]
    assert "http_502: HTTP 502" in rows[0]
    assert (
        '<time datetime="2026-11-26T10:00:00Z" title="2026-11-26T10:00:00Z">30&nbsp;s ago'
    ) in rows[0]
    assert '<td class="n" data-state="pending">&ndash;</td>' in rows[1] and "never" in rows[1]


def test_landing_page_refreshes_itself_only_when_asked(app: Any) -> None:
    refresh = '<meta http-equiv="refresh" content="30">'
    assert refresh not in call(app, "/")[2].decode()
    assert refresh in call(app, "/?refresh=30")[2].decode()
    assert call(app, "/?refresh=abc")[0] == "200 OK"


def test_landing_page_bars_are_stacked_in_proportion(app: Any) -> None:
    page = call(app, "/")[2].decode()
    row = next(line for line in page.splitlines() if 'data-message-id="301"' in line)
    # one recipient in each state: four quarters of the 160 px bar, in state order
    assert re.findall(r'<rect x="([\d.]+)" width="([\d.]+)"', row) == [
        ("0.0", "40.0"),
        ("40.0", "40.0"),
        ("80.0", "40.0"),
        ("120.0", "40.0"),
    ]
    assert "<title>failed 1 (25.0%)</title>" in row
    delivered_only = next(line for line in page.splitlines() if 'data-message-id="300"' in line)
    assert re.findall(r'width="([\d.]+)" height="12" fill', delivered_only) == ["160.0"]
    assert "src=" not in page and 'href="http' not in page  # no external assets


def test_landing_page_escapes_label_values() -> None:
    clock = FakeClock()
    config = make_config(
        "http://127.0.0.1:9/v1",
        MessageSpec("1", MappingProxyType({"campaign": "<script>x</script>"})),
    )
    book = MessageBook(config.polling)
    book.sync(config.messages, clock())
    page = call(create_app(CollectorRegistry(), book, clock=clock), "/")[2].decode()
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page


def test_a_stalled_client_does_not_block_a_scrape(scenario_url: str) -> None:
    host, port = parse_listen_address(scenario_url.removeprefix("http://"))
    with socket.create_connection((host, port)) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes its request
        response = requests.get(f"{scenario_url}/metrics", timeout=3)
    assert response.status_code == 200 and "mailpartner_up" in response.text


@pytest.mark.e2e
def test_live_exposition_passes_promtool(scenario_url: str) -> None:
    promtool = require_tool("promtool")
    body = requests.get(f"{scenario_url}/metrics", timeout=3).content
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_empty_exporter_still_exposes_known_series() -> None:
    clock = FakeClock()
    config = make_config("http://127.0.0.1:9/v1")
    book = MessageBook(config.polling)
    registry = CollectorRegistry()
    registry.register(
        MailPartnerCollector(book, RequestStats([BULK_STATUS]), lambda: config.api, clock)
    )
    body = call(create_app(registry, book), "/metrics")[2].decode()
    for line in (
        'mailpartner_recipients_total{campaign="",state="unknown"} 0.0',
        'mailpartner_delivery_delay_seconds_bucket{campaign="",le="+Inf"} 0.0',
        "mailpartner_exporter_per_message_withheld 0.0",
        'mailpartner_api_errors_total{code="429",endpoint="bulk-status"} 0.0',
        'mailpartner_api_request_failures_total{endpoint="bulk-status",reason="timeout"} 0.0',
        'mailpartner_exporter_messages{phase="final"} 0.0',
        "mailpartner_up 0.0",
    ):
        assert line in body.splitlines()


@pytest.mark.parametrize(
    ("address", "expected"),
    [(":10027", ("", 10027)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:9", ("::1", 9))],
)
def test_listen_addresses(address: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(address) == expected


@pytest.mark.parametrize("address", ["10027", "host:", "host:99999", "host:http"])
def test_bad_listen_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        parse_listen_address(address)
