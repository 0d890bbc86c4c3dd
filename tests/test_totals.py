"""The aggregate counters: bounded label sets, re-sorted on a new aggregate_by, exact growth."""

from __future__ import annotations

import logging
from types import MappingProxyType

import pytest

from exporter.aggregate import MessageAggregate
from exporter.config.model import MetricsConfig
from exporter.domain import MessageSpec, State
from exporter.totals import OTHER, Totals
from exporter.tracker import MessageBook
from tests.conftest import START, TEST_POLLING

BUCKETS = (60.0, 3600.0)


def aggregate(delivered: int, failed: int = 0, delays: tuple[int, ...] = ()) -> MessageAggregate:
    states = {**dict.fromkeys(State, 0), State.DELIVERED: delivered, State.FAILED: failed}
    return MessageAggregate(
        MappingProxyType(states),
        MappingProxyType({"delivered": delivered}),
        cost=0.01 * (delivered + failed),
        unsubscribed=0,
        last_report=None,
        delays=delays or (delivered, 0, 0),
        delay_sum=30.0 * delivered,
    )


def by_label(totals: Totals, state: State = State.DELIVERED) -> dict[tuple[str, ...], int]:
    return {
        tuple(value for _, value in key): tally.recipients[state]
        for key, tally in totals.snapshot().tallies.items()
    }


def test_label_sets_past_the_limit_fold_into_other_and_are_counted() -> None:
    totals = Totals(MetricsConfig(("campaign",), max_aggregate_label_sets=3))
    for campaign in ("a", "b", "c", "d"):  # with the empty set, "c" and "d" are one too many
        labels = {"campaign": campaign}
        totals.seen(labels)
        totals.grow(labels, None, aggregate(10))
    assert by_label(totals) == {("",): 0, ("a",): 10, ("b",): 10, (OTHER,): 20}
    assert totals.overflow == 2
    # A set kept before the limit keeps counting under its own labels.
    totals.grow({"campaign": "a"}, aggregate(10), aggregate(15))
    assert by_label(totals)[("a",)] == 15


def test_a_new_aggregate_by_moves_the_counts_to_the_new_label_sets() -> None:
    totals = Totals(MetricsConfig(("campaign", "team"), delivery_delay_buckets=BUCKETS))
    totals.grow({"campaign": "a", "team": "x"}, None, aggregate(3))
    totals.grow({"campaign": "a", "team": "y"}, None, aggregate(4))
    totals.grow({"campaign": "b"}, None, aggregate(5))
    totals.reconfigure(MetricsConfig(("campaign",), delivery_delay_buckets=BUCKETS))
    assert by_label(totals) == {("",): 0, ("a",): 7, ("b",): 5}
    delays = {k: t.delays for k, t in totals.snapshot().tallies.items()}
    assert delays[(("campaign", "a"),)] == [7, 0, 0]
    # New buckets: the histogram starts again, the counters do not.
    totals.reconfigure(MetricsConfig(("campaign",), delivery_delay_buckets=(1.0,)))
    assert by_label(totals) == {("",): 0, ("a",): 7, ("b",): 5}
    assert {tuple(t.delays) for t in totals.snapshot().tallies.values()} == {(0, 0)}


def test_growth_is_what_a_poll_adds_beyond_the_last_never_a_decrease() -> None:
    totals = Totals(MetricsConfig((), delivery_delay_buckets=BUCKETS))
    totals.grow({}, None, aggregate(2, failed=1, delays=(2, 0, 0)))
    totals.grow({}, aggregate(2, failed=1, delays=(2, 0, 0)), aggregate(5, delays=(3, 2, 0)))
    (tally,) = totals.snapshot().tallies.values()
    assert (tally.recipients[State.DELIVERED], tally.recipients[State.FAILED]) == (5, 1)
    assert tally.delays == [3, 2, 0]  # each delivered recipient once, in its bucket


def test_a_report_dated_before_the_send_is_logged_once_per_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    book = MessageBook(TEST_POLLING, metrics=MetricsConfig(delivery_delay_buckets=BUCKETS))
    book.sync([MessageSpec("1")], START)
    skewed = MessageAggregate(
        MappingProxyType({**dict.fromkeys(State, 0), State.DELIVERED: 1}),
        MappingProxyType({"delivered": 1}),
        0.0,
        0,
        None,
        delays=(1, 0, 0),
        skewed=1,
    )
    with caplog.at_level(logging.WARNING, logger="exporter.tracker"):
        for _ in range(3):
            book.start_poll("1", START)
            book.record_success("1", skewed, START)
    assert [r.getMessage() for r in caplog.records].count(
        "reports dated before the send: counted as delivered at once"
    ) == 1
    (tally,) = [t for t in book.snapshot()[1].tallies.values() if t.messages]
    assert tally.delays == [1, 0, 0]  # in the lowest bucket, once
