"""The API client over real loopback sockets: answers, error codes, transport failures."""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from exporter.aggregate import ReportAggregator
from exporter.client import BULK_STATUS, ApiError, PollError, TransportError
from exporter.domain import MessageSpec, State, StatusMap
from exporter.secret import Secret
from exporter.simulator import Faults, SimulatorServer
from exporter.stats import RequestStats
from tests.conftest import TEST_KEY, CraftedServer, FakeClock, make_client, make_config

Crafted = Callable[[Callable[[str], CraftedServer.Reply]], CraftedServer]


def poll(url: str, message_id: str, stats: RequestStats | None = None, **api: object):  # type: ignore[no-untyped-def]
    client = make_client(make_config(url, **api), stats)
    return client.bulk_status(message_id, ReportAggregator(StatusMap.default()))


def failure(url: str, message_id: str, **api: object) -> tuple[PollError, RequestStats]:
    stats = RequestStats([BULK_STATUS])
    with pytest.raises(PollError) as caught:
        poll(url, message_id, stats, **api)
    assert TEST_KEY not in str(caught.value)
    return caught.value, stats


def test_json_and_xml_answers_agree_with_the_simulators_truth(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    send = simulator.world.send(2000, sent_at=clock() - 120)
    as_json = poll(simulator.url, send.message_id)
    as_xml = poll(simulator.url, send.message_id, format="xml")
    assert as_json == as_xml
    truth = simulator.world.truth(send.message_id)
    assert dict(as_json.statuses) == {k.lower(): v for k, v in truth.statuses.items()}
    assert as_json.states[State.PENDING] == truth.statuses.get("Waiting", 0)
    assert (as_json.cost, as_json.unsubscribed, as_json.last_report) == (
        pytest.approx(truth.cost),
        truth.unsubscribed,
        truth.last_date,
    )


def test_gzip_bodies_are_decoded_while_streaming(simulator: SimulatorServer) -> None:
    send = simulator.world.send(300)
    plain = poll(simulator.url, send.message_id)
    simulator.faults.gzip = True
    assert poll(simulator.url, send.message_id) == plain


@pytest.mark.parametrize(
    ("key", "message_id", "code"),
    [
        ("", "1000", "1"),  # no key
        ("wrong-key", "1000", "10"),
        (TEST_KEY, "", "3"),  # no message ID
        (TEST_KEY, "424242", "4"),  # unknown message
    ],
)
def test_documented_error_codes(
    simulator: SimulatorServer, key: str, message_id: str, code: str
) -> None:
    simulator.world.send(10)
    error, stats = failure(simulator.url, message_id, api_key=Secret(key))
    assert isinstance(error, ApiError) and error.code == code
    snapshot = stats.snapshot()
    assert snapshot.errors[(BULK_STATUS, code)] == 1
    assert sum(snapshot.errors.values()) == 1 and sum(snapshot.failures.values()) == 0
    # code 3 and 4 concern one message: the API itself is up
    assert snapshot.up is (code in ("3", "4"))


@pytest.mark.parametrize("style", ["http", "json"])
def test_rate_limited_as_http_status_or_json_code(simulator: SimulatorServer, style: str) -> None:
    send = simulator.world.send(10)
    faults = Faults(rate_limit_style=style)
    with SimulatorServer(
        simulator.world, api_key=TEST_KEY, rate_limit_per_minute=1, faults=faults
    ) as limited:
        poll(limited.url, send.message_id)  # the one request this minute allows
        error, stats = failure(limited.url, send.message_id)
    assert isinstance(error, ApiError) and error.code == "429"
    assert stats.snapshot().errors[(BULK_STATUS, "429")] == 1


def test_any_other_code_is_kept_as_its_own_label(simulator: SimulatorServer) -> None:
    send = simulator.world.send(10)
    simulator.faults.error_code = 99
    error, stats = failure(simulator.url, send.message_id)
    assert error.label == "99"
    assert stats.snapshot().errors[(BULK_STATUS, "99")] == 1


def test_http_502_with_an_html_page(simulator: SimulatorServer) -> None:
    send = simulator.world.send(10)
    simulator.faults.http_status = 502
    error, stats = failure(simulator.url, send.message_id)
    assert isinstance(error, TransportError) and error.reason == "http_502"
    assert stats.snapshot().failures[(BULK_STATUS, "http_502")] == 1
    assert stats.snapshot().up is False


def test_truncated_body_is_an_invalid_response(simulator: SimulatorServer) -> None:
    send = simulator.world.send(100)
    simulator.faults.invalid_body = True
    for fmt in ("json", "xml"):
        error, _ = failure(simulator.url, send.message_id, format=fmt)
        assert error.label == "invalid_response"


def test_timeout(simulator: SimulatorServer) -> None:
    send = simulator.world.send(10)
    simulator.faults.latency = 1.0
    error, stats = failure(simulator.url, send.message_id, timeout=0.2)
    assert (error.label, str(error)) == ("timeout", "timeout: no answer within 0.2s")
    assert stats.snapshot().failures[(BULK_STATUS, "timeout")] == 1


def test_a_body_that_trickles_past_the_timeout_is_cut_off(crafted: Crafted) -> None:
    def trickle() -> Iterator[bytes]:
        # Each piece well within the 0.3 s a socket read may wait; 0.5 s in all.
        yield b'{"success": true, "code": 200, "StatutResponseList": ['
        for _ in range(10):
            time.sleep(0.05)
            yield b'{"status": "Delivered"},'

    server = crafted(lambda path: (200, {"Connection": "close"}, trickle()))
    error, _ = failure(server.url, "1", timeout=0.3)
    assert error.label == "timeout"


def test_connection_refused() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error, stats = failure(f"http://127.0.0.1:{port}/v1", "1")
    assert error.label == "connection"
    assert "ConnectionRefusedError" in str(error)
    assert stats.snapshot().failures[(BULK_STATUS, "connection")] == 1


def test_an_api_error_wrapped_in_an_http_error_status(crafted: Crafted) -> None:
    body = json.dumps({"success": False, "code": 10, "message": "Clé API incorrecte"}).encode()
    server = crafted(lambda path: (401, {"Content-Length": str(len(body))}, [body]))
    error, _ = failure(server.url, "1")
    assert isinstance(error, ApiError) and (error.code, error.message) == (
        "10",
        "Clé API incorrecte",
    )


def test_gzip_from_a_server_that_always_compresses(crafted: Crafted) -> None:
    raw = json.dumps(
        {
            "success": True,
            "code": 200,
            "StatutResponseList": [{"status": "Delivered", "cost": 0.5}] * 3,
        }
    ).encode()
    packed = gzip.compress(raw)
    server = crafted(
        lambda path: (
            200,
            {"Content-Encoding": "gzip", "Content-Length": str(len(packed))},
            [packed],
        )
    )
    assert poll(server.url, "1").states[State.DELIVERED] == 3


def test_requests_carry_key_and_message_id_and_format(crafted: Crafted) -> None:
    body = b'{"success": true, "code": 200, "StatutResponseList": []}'
    server = crafted(lambda path: (200, {"Content-Length": str(len(body))}, [body]))
    poll(server.url, "300")
    assert server.paths == [f"/v1/bulk-status?apiKey={TEST_KEY}&messageId=300"]


def test_a_tracked_message_id_with_odd_characters_is_encoded(simulator: SimulatorServer) -> None:
    simulator.world.send(5, message_id="a&b=c")
    assert poll(simulator.url, MessageSpec("a&b=c").id).recipients == 5


def test_a_body_over_the_size_cap_is_refused(crafted: Crafted) -> None:
    item = b'{"status": "Delivered"},'
    body = b'{"success": true, "code": 200, "StatutResponseList": [' + item * 5000 + b"{}]}"
    server = crafted(lambda path: (200, {"Content-Length": str(len(body))}, [body]))
    error, _stats = failure(server.url, "1", max_response_bytes=len(body) - 1)
    assert (error.label, str(error)) == (
        "invalid_response",
        f"invalid_response: response body larger than {len(body) - 1} bytes",
    )
    assert poll(server.url, "1", max_response_bytes=len(body)).recipients == 5001
