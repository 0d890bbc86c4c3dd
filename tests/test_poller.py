"""The poll loop under a fake clock: schedule, phases, budget, concurrency, failures."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from exporter.client import BULK_STATUS
from exporter.config.model import Config, MetricsConfig
from exporter.domain import MessageSpec, State, StatusMap
from exporter.poller import Poller
from exporter.schedule import RETRY_AFTER
from exporter.simulator import SimulatorServer
from exporter.stats import RequestStats
from exporter.tracked import Phase, TrackedMessage
from exporter.tracker import COMPACT_EVERY, MessageBook
from exporter.upstream import TokenBucket
from tests.conftest import (
    FakeClock,
    bulk_status_poller,
    make_client,
    make_config,
    with_polling,
)

HOUR = 3600.0
# Every status counts as pending, so messages stay active for their whole life.
ALL_PENDING = StatusMap.from_lists(
    {State.PENDING: ("waiting", "delivered", "not delivered", "bounced", "ko", "deferred")}
)


def most_in_any_window(times: list[float], width: float = 60.0) -> int:
    """The most events inside any half-open window [t, t + width)."""
    times = sorted(times)
    return max(bisect.bisect_left(times, t + width) - i for i, t in enumerate(times))


def build(
    config: Config,
    clock: FakeClock,
    stats: RequestStats | None = None,
) -> tuple[MessageBook, Poller]:
    source, poller = bulk_status_poller(config, make_client(config, stats), clock)
    return source.book, poller


def drive(poller: Poller, clock: FakeClock, seconds: float, step: float = 10.0) -> None:
    end = clock() + seconds
    while clock() < end:
        poller.run_pending()
        clock.advance(step)


def message(book: MessageBook, message_id: str) -> TrackedMessage:
    messages, _ = book.snapshot()
    return next(m for m in messages if m.spec.id == message_id)


def poll_ages(simulator: SimulatorServer, sent_at: float) -> list[float]:
    return [t - sent_at for t in simulator.stats().request_times]


def test_48_hours_follow_the_schedule_then_final(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    send = simulator.world.send(1000, sent_at=clock())
    config = make_config(simulator.url, MessageSpec(send.message_id, sent_at=send.sent_at))
    # Nothing is ever reported under ALL_PENDING: the unreported limits rule, set here to the
    # schedule's last step and to final_after, and nothing is held overnight.
    config = dataclasses.replace(config, status_map=ALL_PENDING)
    config = with_polling(
        config, unreported_every=900.0, unreported_max=48 * HOUR, quiet_hours=False
    )
    book, poller = build(config, clock)

    drive(poller, clock, 49 * HOUR)

    ages = poll_ages(simulator, send.sent_at)
    gaps = Counter(b - a for a, b in itertools.pairwise(ages))
    assert ages[:3] == [0, 30, 60]
    assert [a for a in ages if 570 <= a <= 840] == [570, 600, 720, 840]
    assert [a for a in ages if 6600 <= a <= 9000] == [
        6600,
        6720,
        6840,
        6960,
        7080,
        7200,
        8100,
        9000,
    ]
    assert gaps == {30: 20, 120: 55, 900: 184}
    assert ages[-1] == 48 * HOUR  # the last poll, at final_after
    tracked = message(book, send.message_id)
    assert tracked.phase is Phase.FINAL and tracked.poll_ok and tracked.final_at == clock.now - HOUR
    truth = simulator.world.truth(send.message_id)
    assert tracked.aggregate is not None
    assert tracked.aggregate.cost == pytest.approx(truth.cost)
    assert dict(tracked.aggregate.statuses) == {k.lower(): v for k, v in truth.statuses.items()}


def test_a_real_send_settles_after_its_last_report_then_goes_final(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    send = simulator.world.send(1000, sent_at=clock())
    config = make_config(simulator.url, MessageSpec(send.message_id, sent_at=send.sent_at))
    book, poller = build(config, clock)

    drive(poller, clock, 49 * HOUR)

    ages = poll_ages(simulator, send.sent_at)
    world = simulator.world
    arrived = [
        a for a in ages if "Waiting" not in world.truth(send.message_id, send.sent_at + a).statuses
    ]
    settled_at = arrived[0]  # the first poll that saw nothing pending
    assert settled_at < 48 * HOUR
    assert ages[-2:] == [settled_at, settled_at + HOUR]  # one recheck, then final
    assert message(book, send.message_id).phase is Phase.FINAL


def test_nothing_pending_settles_then_one_recheck_then_final(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    # 20 h after sending, a small send has every report in (seed 7 is fixed).
    send = simulator.world.send(30, sent_at=clock() - 20 * HOUR)
    assert "Waiting" not in simulator.world.truth(send.message_id).statuses
    config = make_config(simulator.url, MessageSpec(send.message_id, sent_at=send.sent_at))
    book, poller = build(config, clock)

    poller.run_pending()
    assert message(book, send.message_id).phase is Phase.SETTLED
    drive(poller, clock, 5 * HOUR)

    assert poll_ages(simulator, send.sent_at) == [20 * HOUR, 21 * HOUR]
    assert message(book, send.message_id).phase is Phase.FINAL


def test_a_message_older_than_final_after_is_polled_once(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    send = simulator.world.send(50, sent_at=clock() - 72 * HOUR)
    config = make_config(simulator.url, MessageSpec(send.message_id, sent_at=send.sent_at))
    book, poller = build(config, clock)
    drive(poller, clock, 2 * HOUR)
    assert simulator.stats().polls == {send.message_id: 1}
    assert message(book, send.message_id).final_at == clock() - 2 * HOUR


def test_final_messages_disappear_after_retention_and_do_not_come_back(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    send = simulator.world.send(50, sent_at=clock() - 72 * HOUR)
    spec = MessageSpec(send.message_id, sent_at=send.sent_at)
    config = with_polling(make_config(simulator.url, spec), retention=HOUR)
    book, poller = build(config, clock)
    poller.run_pending()
    clock.advance(HOUR - 1)
    poller.run_pending()
    assert len(book.snapshot()[0]) == 1
    clock.advance(1)
    poller.run_pending()
    assert book.snapshot()[0] == ()
    book.sync([spec], clock())  # still in the config: stays gone, not polled again
    drive(poller, clock, HOUR)
    assert book.snapshot()[0] == ()
    assert simulator.stats().polls == {send.message_id: 1}


def test_the_budget_holds_in_every_60s_window_and_polls_stay_fair(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    specs = [
        MessageSpec(simulator.world.send(5, sent_at=clock()).message_id, sent_at=clock())
        for _ in range(300)
    ]
    config = make_config(simulator.url, *specs, max_requests_per_minute=60, concurrency=4)
    config = dataclasses.replace(config, status_map=ALL_PENDING)
    _, poller = build(config, clock)

    drive(poller, clock, 15 * 60, step=1.0)

    times = list(simulator.stats().request_times)
    assert most_in_any_window(times) == 60
    # the budget is used, not wasted: a burst of 6, then (60 - 6 + 1) a minute
    assert len(times) >= 6 + 55 * 15 - 1
    polls = simulator.stats().polls.values()
    assert max(polls) - min(polls) <= 1  # most overdue first: nobody starves


def test_at_most_concurrency_requests_at_once(simulator: SimulatorServer) -> None:
    simulator.faults.latency = 0.15
    simulator.world.clock = time.time
    specs = [MessageSpec(simulator.world.send(5).message_id) for _ in range(12)]
    config = make_config(simulator.url, *specs, concurrency=3)
    _, poller = bulk_status_poller(
        config, make_client(config), time.time, executor=ThreadPoolExecutor(8)
    )
    stop = threading.Event()
    loop = threading.Thread(target=poller.run, args=(stop,))
    loop.start()
    deadline = time.monotonic() + 10
    while sum(simulator.stats().polls.values()) < 12 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    poller.wake()
    loop.join(5)
    assert sum(simulator.stats().polls.values()) == 12
    assert simulator.stats().max_in_flight == 3


def test_a_failing_poll_keeps_the_last_values_and_the_loop_goes_on(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    send = simulator.world.send(500, sent_at=clock())
    config = make_config(simulator.url, MessageSpec(send.message_id, sent_at=send.sent_at))
    stats = RequestStats([BULK_STATUS])
    book, poller = build(config, clock, stats)
    clock.advance(60)
    poller.run_pending()
    good = message(book, send.message_id)
    assert good.poll_ok and good.aggregate is not None

    simulator.faults.http_status = 502
    clock.advance(30)
    poller.run_pending()
    failed = message(book, send.message_id)
    assert (failed.poll_ok, failed.aggregate, failed.last_success) == (
        False,
        good.aggregate,
        good.last_success,
    )
    assert failed.last_error == "http_502: HTTP 502"
    assert failed.next_poll == clock() + RETRY_AFTER  # a quick first retry
    assert stats.snapshot().failures[(BULK_STATUS, "http_502")] == 1

    simulator.faults.http_status = None
    clock.advance(30)
    poller.run_pending()
    recovered = message(book, send.message_id)
    assert recovered.poll_ok and recovered.last_error == ""
    assert recovered.aggregate is not None
    assert recovered.aggregate.states[State.DELIVERED] >= good.aggregate.states[State.DELIVERED]


def test_an_unexpected_exception_costs_one_poll_not_the_loop(clock: FakeClock) -> None:
    class BrokenClient:
        stats = RequestStats([BULK_STATUS])

        def bulk_status(self, message_id: str, *args: object) -> None:
            raise RuntimeError("bug")

    config = make_config("http://127.0.0.1:9", MessageSpec("1"), MessageSpec("2"))
    source, poller = bulk_status_poller(config, BrokenClient(), clock)
    book = source.book
    poller.run_pending()
    messages, _ = book.snapshot()
    assert [(m.poll_ok, m.last_error) for m in messages] == [
        (False, "internal error: RuntimeError")
    ] * 2


def test_token_bucket_never_exceeds_its_rate_in_any_window() -> None:
    for per_minute, burst in [(600, 8), (60, 4), (1, 8), (7, 7), (2000, 64)]:
        bucket = TokenBucket(per_minute, burst, now=0.0)
        taken: list[float] = []
        t = 0.0
        while t < 300:
            if bucket.try_take(t):
                taken.append(t)
            else:
                t += max(bucket.wait_time(t), 1e-6)
        worst = most_in_any_window(taken)
        assert worst <= per_minute, (per_minute, burst, worst)
        assert len(taken) >= per_minute * 4, (per_minute, burst, len(taken))


def test_a_message_failing_past_final_after_is_retried_for_a_while_then_final(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    sent_at = clock() - 72 * HOUR
    send = simulator.world.send(10, sent_at=sent_at)
    config = make_config(simulator.url, MessageSpec(send.message_id, sent_at=sent_at))
    book, poller = build(config, clock)
    simulator.faults.http_status = 500
    drive(poller, clock, 3 * HOUR)
    # retried after 10 s, doubling up to the last step's 15 min, for settled_recheck (1 h),
    # then given up
    retries = [0, 10, 30, 70, 150, 310, 630, 1270, 2170, 3070, 3970]
    assert poll_ages(simulator, sent_at) == [72 * HOUR + s for s in retries]
    tracked = message(book, send.message_id)
    assert (tracked.phase, tracked.poll_ok, tracked.last_error, tracked.not_found) == (
        Phase.FINAL,
        False,
        "http_500: HTTP 500",
        False,
    )


def test_a_message_the_api_does_not_know_is_final_as_not_found_after_15_minutes(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    """Junk (a typo, another account's ID) costs a few requests, not two days of them."""
    config = make_config(simulator.url, MessageSpec("424242"))  # sent_at: first seen
    book, poller = build(config, clock)
    start = clock()
    drive(poller, clock, 2 * HOUR)
    assert poll_ages(simulator, start) == [0, 10, 30, 70, 150, 310, 630, 900]
    tracked = message(book, "424242")
    assert (tracked.phase, tracked.not_found, tracked.final_at) == (
        Phase.FINAL,
        True,
        start + 900,
    )
    assert book.not_found == 1


def test_a_message_found_late_is_not_given_up(simulator: SimulatorServer, clock: FakeClock) -> None:
    """The API may take a moment to know a send: not found at first, then found."""
    config = make_config(simulator.url, MessageSpec("5000", sent_at=clock()))
    book, poller = build(config, clock)
    drive(poller, clock, 200)  # not found at 0, 10, 30, 70 and 150 s
    simulator.world.send(10, message_id="5000", sent_at=clock() - 200)
    drive(poller, clock, HOUR)
    tracked = message(book, "5000")
    assert (tracked.poll_ok, tracked.not_found, book.not_found) == (True, False, 0)


def test_a_failing_young_message_still_gets_its_poll_at_final_after(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    send = simulator.world.send(10, sent_at=clock() - 48 * HOUR + 5)
    config = make_config(simulator.url, MessageSpec(send.message_id, sent_at=send.sent_at))
    book, poller = build(config, clock)
    simulator.faults.http_status = 500
    poller.run_pending()
    assert message(book, send.message_id).next_poll == send.sent_at + 48 * HOUR  # not +10 s
    simulator.faults.http_status = None
    drive(poller, clock, HOUR, step=5)
    assert message(book, send.message_id).phase is Phase.FINAL
    assert poll_ages(simulator, send.sent_at) == [48 * HOUR - 5, 48 * HOUR]


def test_a_message_removed_and_added_back_resumes_without_double_counting(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    send = simulator.world.send(200, sent_at=clock() - HOUR)
    spec = MessageSpec(send.message_id, sent_at=send.sent_at)
    config = make_config(simulator.url, spec)
    book, poller = build(config, clock)
    poller.run_pending()
    before = message(book, send.message_id).aggregate
    totals = book.snapshot()[1]
    book.sync([], clock())
    assert book.snapshot()[0] == ()
    book.sync([spec], clock())
    assert message(book, send.message_id).aggregate == before  # last values right away
    poller.run_pending()
    assert book.snapshot()[1] == totals  # nothing new upstream, so nothing added


def test_final_messages_without_series_give_up_their_values_and_come_back_final(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    """Memory follows the messages still polled or shown: a final message whose series are
    withheld keeps no values, and counts nothing twice if it leaves and comes back."""
    sends = [simulator.world.send(20, sent_at=clock() - (49 + i) * HOUR) for i in range(3)]
    specs = [MessageSpec(s.message_id, sent_at=s.sent_at) for s in sends]
    config = dataclasses.replace(
        make_config(simulator.url, *specs), metrics=MetricsConfig(per_message_limit=1)
    )
    book, poller = build(config, clock)
    poller.run_pending()  # past final_after: one poll each, then final
    assert all(m.phase == Phase.FINAL and m.aggregate for m in book.snapshot()[0])
    totals = book.snapshot()[1]
    clock.advance(COMPACT_EVERY)  # the loop's housekeeping looks again within this
    book.expire(clock())
    kept = {m.spec.id: m.aggregate for m in book.snapshot()[0]}
    # The newest sent keeps its values (it has series); the two others give them up.
    assert [i for i, a in kept.items() if a is not None] == [sends[0].message_id]

    book.sync([], clock())
    book.sync(specs, clock())
    assert all(m.phase == Phase.FINAL for m in book.snapshot()[0])
    assert book.next_poll() is None  # never polled again
    clock.advance(HOUR)
    poller.run_pending()
    assert sum(simulator.stats().polls.values()) == 3
    assert book.snapshot()[1] == totals
    # Saved and restored, they are still final: a restart polls none of them again.
    restarted = MessageBook(config.polling, metrics=config.metrics)
    restarted.restore(book.export(clock()))
    restarted.sync(specs, clock())
    assert {m.phase for m in restarted.snapshot()[0]} == {Phase.FINAL}
    assert restarted.next_poll() is None


def test_a_deferred_send_is_not_polled_before_it_goes_out_and_ages_from_then(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    """``scheduled_at``: no polls before it; the schedule and the delivery delays count from it."""
    out = clock() + 2 * HOUR
    send = simulator.world.send(50, sent_at=out)
    spec = MessageSpec(send.message_id, sent_at=clock(), scheduled_at=out)
    book, poller = build(make_config(simulator.url, spec), clock)
    drive(poller, clock, 2 * HOUR + 170)
    ages = poll_ages(simulator, out)
    assert ages[:6] == [0, 30, 60, 90, 120, 150]  # the young schedule, from the scheduled time
    tracked = message(book, send.message_id)
    assert tracked.aggregate is not None and tracked.aggregate.states[State.DELIVERED] > 0
    delivered = tracked.aggregate.states[State.DELIVERED]
    # Delays from the scheduled time: seconds, not the two hours since the send was made.
    assert tracked.aggregate.delay_sum / delivered < 130


def test_a_deferred_send_cancelled_ends_as_not_found_without_polls_before(
    simulator: SimulatorServer, clock: FakeClock
) -> None:
    """Cancelled before it went out, the API no longer knows it: a few polls after the
    scheduled time, then final as not found (no alert watches that)."""
    out = clock() + HOUR
    book, poller = build(make_config(simulator.url, MessageSpec("7777", scheduled_at=out)), clock)
    drive(poller, clock, 2 * HOUR)
    assert poll_ages(simulator, out) == [0, 10, 30, 70, 150, 310, 630, 900]
    tracked = message(book, "7777")
    assert (tracked.phase, tracked.not_found) == (Phase.FINAL, True)


def test_a_new_scheduled_time_moves_a_first_poll_not_yet_made(clock: FakeClock) -> None:
    book = MessageBook(make_config("http://127.0.0.1:9/v1").polling)
    book.sync([MessageSpec("1", scheduled_at=clock() + HOUR)], clock())
    assert book.next_poll() == clock() + HOUR
    book.sync([MessageSpec("1", scheduled_at=clock() + 2 * HOUR)], clock())
    assert book.next_poll() == clock() + 2 * HOUR
    assert book.due(clock() + HOUR, 10) == []
