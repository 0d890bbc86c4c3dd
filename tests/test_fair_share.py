"""A backlog of junk does not starve what the operator configured: registered IDs the API
does not know, and probes of random IDs, against the account poll and configured messages.

In-process on a fake clock against the simulator (polls run inline), so every delay is an
exact number of simulated seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from types import MappingProxyType

import pytest

from exporter.client import BULK_STATUS, ME
from exporter.config.model import ScheduleStep
from exporter.domain import MessageSpec
from exporter.poller import Poller
from exporter.simulator import SimulatorServer, World
from exporter.sources.account import AccountSource
from exporter.sources.base import SourceContext
from exporter.sources.bulk_status import BulkStatusSource
from exporter.stats import RequestStats
from exporter.upstream import Upstream
from tests.conftest import TEST_KEY, FakeClock, InlineExecutor, make_client, make_config

JUNK = 2000  # registered IDs the API does not know
BUDGET = 60  # requests a minute: one a second


@pytest.fixture
def upstream(clock: FakeClock) -> Iterator[SimulatorServer]:
    with SimulatorServer(World(seed=5, clock=clock), api_key=TEST_KEY) as server:
        yield server


def test_junk_registrations_neither_starve_configured_messages_nor_the_account_poll(
    upstream: SimulatorServer, clock: FakeClock
) -> None:
    send = upstream.world.send(10, sent_at=clock())
    config = make_config(
        upstream.url,
        MessageSpec(send.message_id, sent_at=send.sent_at),
        max_requests_per_minute=BUDGET,
        concurrency=1,
    )
    schedule = (ScheduleStep(until=3600.0, every=60.0),)
    config = dataclasses.replace(
        config, polling=dataclasses.replace(config.polling, schedule=schedule)
    )
    client = make_client(config, RequestStats([BULK_STATUS, ME]))
    shared = Upstream(config.api, client, client.stats, clock())
    context = SourceContext(config, shared, clock, jitter=lambda: 1.0)
    messages = BulkStatusSource(context, {})
    account = AccountSource(context, {"every": 300.0})
    poller = Poller([messages, account], clock=clock, executor=InlineExecutor())
    junk = MappingProxyType({"campaign": "junk"})
    for n in range(JUNK):
        messages.register(MessageSpec(f"junk-{n}", junk))

    start = clock()
    for _ in range(1800):  # half an hour, a turn a second
        poller.run_pending()
        clock.advance(1.0)

    log = upstream.stats().log
    configured = [t - start for t, _, m in log if m == send.message_id]
    # Every minute on the minute, give or take a turn: never behind the 2,000 junk polls.
    assert configured[:30] == pytest.approx([60.0 * n for n in range(30)], abs=2.0)
    me = [t - start for t, endpoint, _ in log if endpoint == "me"]
    assert me[:6] == pytest.approx([0, 300, 600, 900, 1200, 1500], abs=2.0)
    # The junk costs a few requests each: final as not found 15 minutes after registration.
    polls = upstream.stats().polls
    assert max(polls.get(f"junk-{n}", 0) for n in range(JUNK)) <= 8
    exposed = {m.name: m.samples[0].value for m in messages.collect() if m.samples}
    ended = sum(1 for m in messages.book.snapshot()[0] if m.not_found)
    assert exposed["mailpartner_exporter_messages_not_found"] == ended > 0
