"""/probe?message_id=ID: a message polled at scrape time, within the scrape's timeout and the
request budget, cached briefly. Over real HTTP against the simulator on loopback.

The exporter and the simulated world share the ``clock`` fixture: it only moves when a test
says so, so each probe's deadline, cache age and request budget are exact numbers, not races
with the machine's speed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.aggregate import MessageAggregate, ReportAggregator
from exporter.app import Exporter, load_runnable
from exporter.parse import MAIL, ReportShape
from exporter.probe import MARGIN
from exporter.simulator import SimulatorServer, World
from tests.conftest import TEST_KEY, FakeClock

Probe = Callable[..., requests.Response]
# How long a probe answer may take before the test calls it hung: a failure guard only.
PATIENCE = 30.0


@pytest.fixture
def upstream(clock: FakeClock) -> Iterator[SimulatorServer]:
    # The simulated world stands still: its reports are what the test computes.
    with SimulatorServer(World(seed=9, clock=clock), api_key=TEST_KEY) as server:
        yield server


def start(
    tmp_path: Path, upstream: SimulatorServer, clock: FakeClock, **document: Any
) -> Iterator[tuple[Exporter, Probe]]:
    path = tmp_path / "config.yaml"
    api = {"base_url": upstream.url, "api_key": TEST_KEY, **document.pop("api", {})}
    path.write_text(yaml.safe_dump({"api": api, "state": {"path": ":memory:"}, **document}))
    exporter = Exporter(load_runnable(str(path), demo=False), str(path), clock=clock)
    server = exporter.serve("127.0.0.1:0", "/metrics")

    def get(
        message_id: str | None, timeout: float | None = None, params: dict[str, str] | None = None
    ) -> requests.Response:
        headers = {} if timeout is None else {"X-Prometheus-Scrape-Timeout-Seconds": str(timeout)}
        query = params or {} if message_id is None else {"message_id": message_id}
        return requests.get(
            f"http://127.0.0.1:{server.server_port}/probe",
            params=query,
            headers=headers,
            timeout=PATIENCE,
        )

    yield exporter, get
    server.shutdown()
    server.server_close()


@pytest.fixture
def probing(
    upstream: SimulatorServer, tmp_path: Path, clock: FakeClock
) -> Iterator[tuple[Exporter, Probe]]:
    yield from start(tmp_path, upstream, clock)


def request_timeouts(exporter: Exporter, monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """The ``timeout`` each bulk-status request is given from now on (the requests still go
    through): what a probe computed from the scrape's timeout, whatever the machine's speed."""
    client = exporter.mailpartner.client
    real = client.bulk_status
    timeouts: list[float | None] = []

    def recording(
        message_id: str,
        aggregator: ReportAggregator,
        shape: ReportShape = MAIL,
        timeout: float | None = None,
    ) -> MessageAggregate:
        timeouts.append(timeout)
        return real(message_id, aggregator, shape, timeout=timeout)

    monkeypatch.setattr(client, "bulk_status", recording)
    return timeouts


def samples(answer: requests.Response) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def one(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found[(name, frozenset(labels.items()))]


def test_a_probe_polls_the_message_and_answers_its_series(
    probing: tuple[Exporter, Probe], upstream: SimulatorServer, clock: FakeClock
) -> None:
    exporter, get = probing
    send = upstream.world.send(80)
    clock.advance(30)  # some reports are in
    found = samples(get(send.message_id))
    truth = upstream.world.truth(send.message_id)
    recipients = {
        state: one(found, "mailpartner_message_recipients", message_id=send.message_id, state=state)
        for state in ("delivered", "failed", "pending", "unknown")
    }
    assert recipients["pending"] == truth.statuses.get("Waiting", 0)
    assert sum(recipients.values()) == 80
    assert one(found, "mailpartner_message_cost", message_id=send.message_id) == pytest.approx(
        truth.cost
    )
    assert one(found, "mailpartner_probe_success") == 1
    assert 0 < one(found, "mailpartner_probe_duration_seconds") < 5
    # Counted like any poll; not tracked afterwards.
    assert (
        exporter.registry.get_sample_value(
            "mailpartner_api_requests_total", {"endpoint": "bulk-status"}
        )
        == 1
    )
    assert exporter.book.snapshot()[0] == ()


def test_a_second_probe_within_the_cache_time_makes_no_request(
    probing: tuple[Exporter, Probe], upstream: SimulatorServer
) -> None:
    _, get = probing
    message = upstream.world.send(10).message_id
    first = get(message).text
    answers: list[str] = []
    threads = [threading.Thread(target=lambda: answers.append(get(message).text)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [first] * 4
    assert upstream.stats().polls == {message: 1}


def test_probes_of_one_message_at_once_make_one_request(
    probing: tuple[Exporter, Probe], upstream: SimulatorServer
) -> None:
    _, get = probing
    message = upstream.world.send(10).message_id
    upstream.faults.latency = 0.5  # all four arrive while the first is polling
    answers: list[requests.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(get(message))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [one(samples(a), "mailpartner_probe_success") for a in answers] == [1] * 4
    assert upstream.stats().polls == {message: 1}


def test_a_probe_ends_within_the_scrape_timeout(
    probing: tuple[Exporter, Probe], upstream: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter, get = probing
    timeouts = request_timeouts(exporter, monkeypatch)
    message = upstream.world.send(10).message_id
    scrape_timeout = MARGIN + 0.25
    upstream.faults.latency = 10  # far longer than the scrape: only the timeout ends the poll
    started = time.monotonic()
    found = samples(get(message, timeout=scrape_timeout))
    # The request gets what is left of the scrape less the margin for the answer's way back,
    # so Prometheus still gets the answer.
    assert timeouts == [pytest.approx(scrape_timeout - MARGIN)]
    assert one(found, "mailpartner_probe_success") == 0
    assert not any(name == "mailpartner_message_recipients" for name, _ in found)
    # A guard, not the measurement: waiting for the upstream's answer would take 10 s.
    assert time.monotonic() - started < scrape_timeout + 5


def test_a_failed_probe_keeps_the_last_good_values(
    upstream: SimulatorServer, tmp_path: Path, clock: FakeClock
) -> None:
    cache = {"sources": {"bulk_status": {"probe_cache": "1s"}}}
    for _, get in start(tmp_path, upstream, clock, **cache):
        failed_probe_keeps_the_last_good_values(get, upstream, clock)


def failed_probe_keeps_the_last_good_values(
    get: Probe, upstream: SimulatorServer, clock: FakeClock
) -> None:
    message = upstream.world.send(30).message_id
    good = samples(get(message))
    upstream.faults.http_status = 502
    clock.advance(1)  # the first answer is past the probe cache
    bad = samples(get(message))
    assert one(bad, "mailpartner_probe_success") == 0
    assert one(bad, "mailpartner_message_poll_success", message_id=message) == 0
    for state in ("delivered", "failed", "pending", "unknown"):
        key = (
            "mailpartner_message_recipients",
            frozenset({"message_id": message, "state": state}.items()),
        )
        assert bad[key] == good[key]


def test_an_unknown_message_fails_the_probe_not_the_scrape(
    probing: tuple[Exporter, Probe],
) -> None:
    exporter, get = probing
    found = samples(get("424242"))
    assert one(found, "mailpartner_probe_success") == 0
    assert (
        exporter.registry.get_sample_value(
            "mailpartner_api_errors_total", {"endpoint": "bulk-status", "code": "4"}
        )
        == 1
    )


def test_probes_spend_the_same_request_budget(
    upstream: SimulatorServer, tmp_path: Path, clock: FakeClock
) -> None:
    a, b = (upstream.world.send(5).message_id for _ in range(2))
    for _, get in start(tmp_path, upstream, clock, api={"max_requests_per_minute": 1}):
        assert one(samples(get(a)), "mailpartner_probe_success") == 1
        # The next token is a minute away, past the scrape's deadline: refused at once, without
        # a request (with the clock standing still, waiting for it would never end).
        refused = samples(get(b, timeout=2))
        assert one(refused, "mailpartner_probe_success") == 0
        assert one(refused, "mailpartner_probe_duration_seconds") == 0
    assert upstream.stats().polls == {a: 1}


def test_a_tracked_message_keeps_its_labels(
    upstream: SimulatorServer, tmp_path: Path, clock: FakeClock
) -> None:
    message = upstream.world.send(5).message_id
    tracked = {"messages": [{"id": message, "labels": {"campaign": "spring"}}]}
    for _, get in start(tmp_path, upstream, clock, **tracked):
        found = samples(get(message))
        assert (
            one(found, "mailpartner_message_poll_success", message_id=message, campaign="spring")
            == 1
        )


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({}, 400),
        ({"message_id": ""}, 400),
        ({"message_id": "a b"}, 400),
        ({"message_id": "1", "source": "fax"}, 400),
    ],
)
def test_a_bad_probe_request_is_refused(
    probing: tuple[Exporter, Probe], params: dict[str, str], status: int
) -> None:
    _, get = probing
    assert get(None, params=params).status_code == status


def test_a_tracked_message_is_answered_from_its_last_poll(
    upstream: SimulatorServer, tmp_path: Path, clock: FakeClock
) -> None:
    message = upstream.world.send(5).message_id
    for exporter, get in start(tmp_path, upstream, clock, messages=[{"id": message}]):
        assert exporter.poller.poll_all()
        found = samples(get(message))
        assert one(found, "mailpartner_probe_success") == 1
        assert one(found, "mailpartner_probe_duration_seconds") == 0  # no request of its own
    assert upstream.stats().polls == {message: 1}


def test_probes_of_untracked_ids_spend_at_most_a_tenth_of_the_budget(
    upstream: SimulatorServer, tmp_path: Path, clock: FakeClock
) -> None:
    """600 probes of random IDs in a minute: 60 requests at most, the rest refused at once."""
    for exporter, get in start(tmp_path, upstream, clock, api={"max_requests_per_minute": 600}):
        refused = []
        for second in range(60):
            for n in range(10):
                found = samples(get(f"junk-{second}-{n}", timeout=2))
                if one(found, "mailpartner_probe_success") == 0 and (
                    one(found, "mailpartner_probe_duration_seconds") == 0
                ):
                    refused.append(found)
            clock.advance(1.0)
        requests_made = sum(upstream.stats().polls.values())
        assert 55 <= requests_made <= 61
        assert len(refused) == 600 - requests_made
        # What is left of the minute's budget is the background polls': no probe took it.
        assert (
            exporter.mailpartner.bucket.available(clock()) == exporter.mailpartner.bucket.capacity
        )


def test_a_probe_cut_off_by_shutdown_answers_503(
    probing: tuple[Exporter, Probe],
) -> None:
    exporter, get = probing
    exporter.mailpartner.abort()  # what SIGTERM does after its grace period
    answer = get("424242")
    assert (answer.status_code, answer.text) == (503, "shutting down\n")
