"""A message's life counts from its first report: held sends (the sending calendar),
deferred sends and sends that never report anything. Against the simulator on a fake clock,
polls inline, so every poll time is exact."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections.abc import Iterator

import pytest

from exporter.aggregate import MessageAggregate
from exporter.calendar import PARIS
from exporter.collector import MailPartnerCollector
from exporter.config.model import ApiConfig, Config
from exporter.domain import MessageSpec, State, StatusMap
from exporter.landing import render_landing
from exporter.poller import Poller
from exporter.simulator import SimulatorServer, World
from exporter.tracked import Phase, TrackedMessage
from exporter.tracker import MessageBook
from tests.conftest import TEST_KEY, FakeClock, bulk_status_poller, make_client, make_config

HOUR = 3600.0
DAY = 24 * HOUR
FRIDAY_21H = dt.datetime(2026, 12, 4, 21, 0, tzinfo=PARIS).timestamp()
MONDAY_8H = dt.datetime(2026, 12, 7, 8, 0, tzinfo=PARIS).timestamp()
ALL_PENDING = StatusMap.from_lists({State.PENDING: ("waiting", "delivered", "not delivered")})
DELIVERED_ONLY = StatusMap.from_lists(
    {State.DELIVERED: ("delivered",), State.PENDING: ("waiting", "not delivered")}
)


@pytest.fixture
def friday() -> FakeClock:
    return FakeClock(FRIDAY_21H)


@pytest.fixture
def upstream(friday: FakeClock) -> Iterator[SimulatorServer]:
    with SimulatorServer(World(seed=11, clock=friday), api_key=TEST_KEY) as server:
        yield server


def run_until(poller: Poller, book: MessageBook, clock: FakeClock, end: float) -> None:
    """Run the loop, jumping the clock from one due poll to the next, up to ``end``."""
    while clock() < end:
        poller.run_pending()
        due = book.next_poll()
        clock.now = end if due is None else min(end, max(due, clock() + 0.001))
    poller.run_pending()


def track(config: Config, clock: FakeClock) -> tuple[MessageBook, Poller]:
    source, poller = bulk_status_poller(config, make_client(config), clock)
    return source.book, poller


def polls(upstream: SimulatorServer, message_id: str) -> list[float]:
    return [at for at, _, polled in upstream.stats().log if polled == message_id]


def only(book: MessageBook) -> TrackedMessage:
    (message,) = book.snapshot()[0]
    return message


def test_a_newsletter_held_over_the_weekend_is_polled_at_the_opening_and_ages_from_then(
    upstream: SimulatorServer, friday: FakeClock
) -> None:
    """Sent on Friday at 21:00, it goes out on Monday at 08:00: one poll on Friday, the next
    within a minute of the opening, then the schedule from its first report."""
    send = upstream.world.send(200, sent_at=MONDAY_8H)  # the platform sends it at the opening
    spec = MessageSpec(send.message_id, sent_at=FRIDAY_21H)
    # Failed recipients count as pending here, so the message stays active to its end.
    config = dataclasses.replace(make_config(upstream.url, spec), status_map=DELIVERED_ONLY)
    book, poller = track(config, friday)

    run_until(poller, book, friday, MONDAY_8H - 60)
    assert polls(upstream, send.message_id) == [FRIDAY_21H]
    held = only(book)
    assert (held.phase, held.held_until, held.first_report) == (Phase.ACTIVE, MONDAY_8H, None)

    run_until(poller, book, friday, MONDAY_8H + 49 * HOUR)
    times = polls(upstream, send.message_id)
    assert 0 <= times[1] - MONDAY_8H <= 60  # within a minute of 08:00
    message = only(book)
    assert message.first_report is not None and message.first_report - MONDAY_8H <= 120
    assert times[2] - times[1] == 30  # the young schedule, from the first report
    # final_after (48 h) from the first report, not from Friday's send: Wednesday morning.
    assert message.phase is Phase.FINAL
    assert times[-1] == message.first_report + 48 * HOUR


def test_a_transactional_message_is_not_held(upstream: SimulatorServer, friday: FakeClock) -> None:
    send = upstream.world.send(1, sent_at=FRIDAY_21H + 1800)  # reported half an hour later
    spec = MessageSpec(send.message_id, sent_at=FRIDAY_21H, transactional=True)
    book, poller = track(make_config(upstream.url, spec), friday)
    run_until(poller, book, friday, FRIDAY_21H + 2 * HOUR)
    first = only(book).first_report
    assert first is not None and first < FRIDAY_21H + HOUR  # seen the same evening
    unreported = [t for t in polls(upstream, send.message_id) if t <= first]
    assert all(b - a <= 600 for a, b in itertools.pairwise(unreported))


def test_a_label_the_operator_names_marks_messages_transactional(
    upstream: SimulatorServer, friday: FakeClock
) -> None:
    send = upstream.world.send(1, sent_at=FRIDAY_21H + 1800)
    spec = MessageSpec(send.message_id, {"campaign": "invoice"}, sent_at=FRIDAY_21H)
    config = make_config(upstream.url, spec)
    polling = dataclasses.replace(
        config.polling, transactional_labels=(("campaign", frozenset({"invoice"})),)
    )
    book, poller = track(dataclasses.replace(config, polling=polling), friday)
    run_until(poller, book, friday, FRIDAY_21H + 2 * HOUR)
    assert only(book).held_until is None and only(book).first_report is not None


def test_nothing_reported_is_polled_at_most_every_10_minutes_then_final_after_7_days(
    upstream: SimulatorServer, friday: FakeClock
) -> None:
    send = upstream.world.send(10, sent_at=FRIDAY_21H)
    config = dataclasses.replace(
        make_config(upstream.url, MessageSpec(send.message_id, sent_at=FRIDAY_21H)),
        status_map=ALL_PENDING,
    )
    config = dataclasses.replace(
        config, polling=dataclasses.replace(config.polling, quiet_hours=False)
    )
    book, poller = track(config, friday)
    run_until(poller, book, friday, FRIDAY_21H + 8 * DAY)
    times = polls(upstream, send.message_id)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) == 600 and times[-1] == FRIDAY_21H + 7 * DAY
    message = only(book)
    assert (message.phase, message.unreported) == (Phase.FINAL, True)
    assert book.unreported == 1
    # The young schedule (20 polls 30 s apart, 55 polls 120 s apart), then every 10 minutes.
    assert len(times) == 20 + 55 + (7 * DAY - 2 * HOUR) / 600 + 1


def test_the_first_report_survives_a_restart(upstream: SimulatorServer, friday: FakeClock) -> None:
    send = upstream.world.send(50, sent_at=MONDAY_8H)
    spec = MessageSpec(send.message_id, sent_at=FRIDAY_21H)
    config = make_config(upstream.url, spec)
    book, poller = track(config, friday)
    run_until(poller, book, friday, MONDAY_8H + HOUR)
    first = only(book).first_report
    assert first is not None and first >= MONDAY_8H

    again = MessageBook(config.polling)
    again.restore(book.export(friday()))
    again.sync([spec], friday())
    assert only(again).first_report == first  # Monday's, not Friday's send


def held_book(clock: FakeClock) -> MessageBook:
    """A newsletter polled on Friday at 21:00, nothing reported: held until Monday."""
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    book.sync([MessageSpec("friday", {"campaign": "news"}, sent_at=FRIDAY_21H)], clock())
    book.start_poll("friday", clock())
    waiting = MessageAggregate(dict.fromkeys(State, 0) | {State.PENDING: 500}, {}, 0.0, 0, None)
    book.record_success("friday", waiting, clock())
    book.add(MessageSpec("later", scheduled_at=MONDAY_8H + DAY), clock())
    return book


def test_held_and_deferred_messages_are_shown_as_such(friday: FakeClock) -> None:
    book = held_book(friday)
    page = render_landing(book, "/metrics", friday)
    assert "held until <time" in page and ">Mon 08:00</time>" in page
    assert "scheduled for <time" in page and ">Tue 08:00</time>" in page
    collector = MailPartnerCollector(book, None, ApiConfig, friday)
    phases = {
        s.labels["phase"]: s.value
        for m in collector.collect()
        if m.name == "mailpartner_exporter_messages"
        for s in m.samples
    }
    assert phases == {"active": 0, "settled": 0, "final": 0, "held": 1, "scheduled": 1}
    # Neither asks for any request until it goes out.
    demand = [
        s.value
        for m in collector.collect()
        if m.name == "mailpartner_exporter_scheduled_requests_per_minute"
        for s in m.samples
    ]
    assert demand == [0]


def test_a_deferred_send_cancelled_before_it_went_out_ends_quietly(
    upstream: SimulatorServer, friday: FakeClock
) -> None:
    """Deferred to Monday 10:00, then cancelled: no poll before 10:00, then the API no longer
    knows it, and it ends as not found 15 minutes later."""
    out = MONDAY_8H + 2 * HOUR
    send = upstream.world.send(100, sent_at=FRIDAY_21H, scheduled_at=out, commercial=True)
    spec = MessageSpec(send.message_id, sent_at=FRIDAY_21H, scheduled_at=out)
    book, poller = track(make_config(upstream.url, spec), friday)
    run_until(poller, book, friday, FRIDAY_21H + DAY)
    upstream.world.cancel(send.message_id)
    run_until(poller, book, friday, out + HOUR)
    assert [t - out for t in polls(upstream, send.message_id)] == [
        0,
        10,
        30,
        70,
        150,
        310,
        630,
        900,
    ]
    message = only(book)
    assert (message.phase, message.not_found, message.unreported) == (Phase.FINAL, True, False)


def test_a_send_deferred_into_quiet_hours_shows_it_will_be_held(friday: FakeClock) -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    tuesday_night = dt.datetime(2026, 12, 8, 21, 0, tzinfo=PARIS).timestamp()
    book.sync([MessageSpec("night", scheduled_at=tuesday_night)], friday())
    book.sync(
        [
            MessageSpec("night", scheduled_at=tuesday_night),
            MessageSpec("receipt", scheduled_at=tuesday_night, transactional=True),
        ],
        friday(),
    )
    page = render_landing(book, "/metrics", friday)
    assert ">Tue 21:00</time>, held until <time" in page and ">Wed 08:00</time>" in page
    assert page.count("held until") == 1  # not the transactional one
