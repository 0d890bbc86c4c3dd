"""The upstream misbehaving: the exporter keeps serving, keeps its last good values, tells
the truth in its metrics, and backs off as a whole when rate-limited."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import pytest

from exporter.client import BULK_STATUS
from exporter.domain import MessageSpec
from exporter.simulator import Faults, SimulatorServer, World
from exporter.upstream import RATE_LIMIT_PAUSE
from tests.conftest import TEST_KEY, FakeClock, make_config
from tests.scenario import Running, running
from tests.test_poller import ALL_PENDING


def series(exposition: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in exposition.splitlines() if line[:1] != "#"}


@pytest.fixture
def exporter(simulator: SimulatorServer, clock: FakeClock) -> Iterator[Running]:
    send = simulator.world.send(500, sent_at=clock() - 60)
    config = make_config(
        simulator.url, MessageSpec(send.message_id, sent_at=send.sent_at), timeout=0.3
    )
    with running(config, clock) as exporter:
        yield exporter


FAULTS = {
    "timeout": (Faults(latency=0.6), "mailpartner_api_request_failures_total", "timeout"),
    "http_500": (Faults(http_status=500), "mailpartner_api_request_failures_total", "http_500"),
    "http_502": (Faults(http_status=502), "mailpartner_api_request_failures_total", "http_502"),
    "invalid_body": (
        Faults(invalid_body=True),
        "mailpartner_api_request_failures_total",
        "invalid_response",
    ),
    "key_rejected": (Faults(reject_key=True), "mailpartner_api_errors_total", "10"),
    "429_json": (Faults(error_code=429), "mailpartner_api_errors_total", "429"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_through_a_fault_metrics_answer_and_keep_the_last_good_values(
    exporter: Running, simulator: SimulatorServer, fault: str
) -> None:
    faults, counter, label = FAULTS[fault]
    message_id = exporter.config.messages[0].id
    exporter.step()
    good = exporter.scrape()
    delivered = exporter.value(
        "mailpartner_message_recipients", message_id=message_id, state="delivered"
    )
    assert exporter.value("mailpartner_up") == 1 and delivered

    simulator.faults = faults
    label_name = "reason" if "failures" in counter else "code"
    for attempt in (1, 2):
        exporter.step(300)  # well past any retry or pause
        during = exporter.scrape()
        assert exporter.value(counter, endpoint=BULK_STATUS, **{label_name: label}) == attempt
        assert exporter.value("mailpartner_message_poll_success", message_id=message_id) == 0
        assert exporter.value("mailpartner_up") == 0
        assert (
            exporter.value(
                "mailpartner_message_recipients", message_id=message_id, state="delivered"
            )
            == delivered
        )  # the last good value
    # no series lost; the only new one is the counter of a reason seen for the first time
    assert series(good) - series(during) == set()
    assert {s for s in series(during) - series(good)} <= {
        f'mailpartner_api_request_failures_total{{endpoint="bulk-status",reason="{label}"}}'
    }

    simulator.faults = Faults()
    exporter.step(600)
    assert exporter.value("mailpartner_message_poll_success", message_id=message_id) == 1
    assert exporter.value("mailpartner_up") == 1


def test_connection_refused(exporter: Running, simulator: SimulatorServer) -> None:
    simulator.stop()  # before any kept-alive connection exists
    exporter.step()
    exporter.scrape()
    assert (
        exporter.value(
            "mailpartner_api_request_failures_total", endpoint=BULK_STATUS, reason="connection"
        )
        == 1
    )
    assert exporter.value("mailpartner_up") == 0


def test_flapping_errors_keep_values_monotonic_and_counters_exact(
    exporter: Running, simulator: SimulatorServer
) -> None:
    message_id = exporter.config.messages[0].id
    last = 0.0
    expected_failures = 0
    for i in range(12):
        broken = i % 3 == 1
        simulator.faults = Faults(http_status=503) if broken else Faults()
        exporter.step(120)
        expected_failures += broken
        delivered = exporter.value(
            "mailpartner_message_recipients", message_id=message_id, state="delivered"
        )
        assert delivered is not None and delivered >= last
        last = delivered
        assert exporter.value("mailpartner_message_poll_success", message_id=message_id) == (
            0 if broken else 1
        )
    assert (
        exporter.value(
            "mailpartner_api_request_failures_total", endpoint=BULK_STATUS, reason="http_503"
        )
        == expected_failures
    )
    assert exporter.value("mailpartner_recipients_total", campaign="", state="delivered") == last


@pytest.fixture
def crowded(clock: FakeClock) -> Iterator[tuple[SimulatorServer, list[MessageSpec]]]:
    """An upstream that allows 5 requests a minute from this address (the rest of the
    2,000 is used by the customer's own sending), and 20 messages to poll."""
    with SimulatorServer(
        World(seed=3, clock=clock),
        api_key=TEST_KEY,
        rate_limit_per_minute=5,
        faults=Faults(retry_after=30),
    ) as server:
        specs = [
            MessageSpec(server.world.send(5, sent_at=clock()).message_id, sent_at=clock())
            for _ in range(20)
        ]
        yield server, specs


@pytest.mark.parametrize("style", ["http", "json"])
def test_retry_after_pauses_every_poll_not_just_one(
    crowded: tuple[SimulatorServer, list[MessageSpec]], clock: FakeClock, style: str
) -> None:
    simulator, specs = crowded
    simulator.faults.rate_limit_style = style
    config = dataclasses.replace(make_config(simulator.url, *specs), status_map=ALL_PENDING)
    with running(config, clock) as exporter:
        for _ in range(180):
            exporter.step(1)
    times = simulator.stats().request_times
    limited = [t for t, nxt in itertools.pairwise(times) if nxt - t >= 30]
    # 5 answered a minute, then one 429 that stops everybody for Retry-After (30 s)
    assert len(times) <= 3 * (5 + 2) + 1
    assert len(limited) >= 4
    assert (
        exporter.value("mailpartner_api_errors_total", endpoint=BULK_STATUS, code="429")
        == len(times) - 5 * 3
    )


def test_without_retry_after_the_pause_doubles(
    crowded: tuple[SimulatorServer, list[MessageSpec]], clock: FakeClock
) -> None:
    simulator, specs = crowded
    simulator.faults = Faults(error_code=429)  # every answer is a 429, with no Retry-After
    config = dataclasses.replace(make_config(simulator.url, *specs), status_map=ALL_PENDING)
    with running(config, clock) as exporter:
        for _ in range(200):
            exporter.step(1)
    times = simulator.stats().request_times
    gaps = [round(b - a) for a, b in itertools.pairwise(times)]
    assert gaps[:5] == [RATE_LIMIT_PAUSE * 2**n for n in range(5)]  # 5, 10, 20, 40, 80 s
