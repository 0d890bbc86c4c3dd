"""Per-recipient reports -> one ``MessageAggregate``; the recipient list is never kept."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import reduce
from operator import add
from types import MappingProxyType
from typing import TypeVar

from exporter.domain import State, StatusMap

MAX_STATUSES = 20
# Report dates are whole seconds: one less than a second before the send is not skew.
DATE_RESOLUTION = 1.0
OTHER_STATUS = "other"
# Distinct raw spellings remembered while parsing one response; past this a
# hostile body with a million different statuses stops growing the dict.
_MAX_RAW_SPELLINGS = 256


@dataclass(frozen=True, slots=True)
class MessageAggregate:
    """What one bulk-status response says about a message, summed over recipients."""

    states: Mapping[State, int]
    statuses: Mapping[str, int]
    cost: float
    unsubscribed: int
    last_report: float | None
    # Delivered recipients by delivery delay (report date less the send's time): one count
    # per bucket of the configured bounds, then +Inf (not cumulative); empty when not asked.
    delays: tuple[int, ...] = ()
    delay_sum: float = 0.0
    # Delivered recipients whose report is dated before the send (clock skew): counted in
    # the lowest bucket.
    skewed: int = 0

    @property
    def recipients(self) -> int:
        return sum(self.states.values())

    @property
    def pending(self) -> int:
        return self.states[State.PENDING]


class ReportAggregator:
    """Feed it one recipient report at a time; ``result()`` gives the aggregate.

    Per report it only bumps a counter keyed by the raw status as received:
    lower-casing and state mapping happen once per distinct spelling.
    """

    __slots__ = (
        "_bounds",
        "_cost",
        "_delay_sum",
        "_delays",
        "_last",
        "_max_statuses",
        "_overflow",
        "_raw",
        "_sent_at",
        "_skewed",
        "_status_map",
        "_unsubscribed",
    )

    def __init__(
        self,
        status_map: StatusMap,
        max_statuses: int = MAX_STATUSES,
        *,
        sent_at: float | None = None,
        delay_buckets: tuple[float, ...] = (),
    ) -> None:
        """With ``sent_at`` and ``delay_buckets``, delivered recipients are also counted by
        their delivery delay (``MessageAggregate.delays``)."""
        self._status_map = status_map
        self._max_statuses = max_statuses
        self._raw: dict[str, int] = {}
        self._overflow: dict[State, int] = {}
        self._cost = 0.0
        self._unsubscribed = 0
        self._last: float | None = None
        self._sent_at = sent_at
        self._bounds = delay_buckets if sent_at is not None else ()
        self._delays = [0] * (len(self._bounds) + 1) if self._bounds else []
        self._delay_sum = 0.0
        self._skewed = 0

    @property
    def counts_delays(self) -> bool:
        return bool(self._bounds)

    def delivered(self, status: str) -> bool:
        return self._status_map.state_of(status) is State.DELIVERED

    def add(self, status: str, cost: float, stop_mail: bool, date: float | None) -> None:
        raw = self._raw
        if status in raw:
            raw[status] += 1
        elif len(raw) < _MAX_RAW_SPELLINGS:
            raw[status] = 1
        else:
            state = self._status_map.state_of(status)
            self._overflow[state] = self._overflow.get(state, 0) + 1
        if date is not None and self._bounds and self.delivered(status):
            self.add_delivered({date: 1})
        self._cost += cost
        if stop_mail:
            self._unsubscribed += 1
        if date is not None and (self._last is None or date > self._last):
            self._last = date

    def add_many(
        self,
        statuses: Mapping[str, int],
        costs: Iterable[float],
        unsubscribed: int,
        last: float | None,
    ) -> None:
        """What ``add`` does for each of many reports, at once: ``statuses`` counts them by
        status in the order each status first appeared, and ``costs`` are summed in order,
        so the totals are exactly those of adding the reports one by one."""
        raw = self._raw
        for status, count in statuses.items():
            if status in raw:
                raw[status] += count
            elif len(raw) < _MAX_RAW_SPELLINGS:
                raw[status] = count
            else:
                state = self._status_map.state_of(status)
                self._overflow[state] = self._overflow.get(state, 0) + count
        self._cost = reduce(add, costs, self._cost)
        self._unsubscribed += unsubscribed
        if last is not None and (self._last is None or last > self._last):
            self._last = last

    def add_delivered(self, dates: Mapping[float, int]) -> None:
        """Count delivered recipients by report date (``{date: recipients}``) into the delay
        buckets; a date before the send counts in the lowest bucket, as ``skewed``, unless
        within the send's own second (report dates are whole seconds, ``sent_at`` need not be)."""
        if not self._bounds or self._sent_at is None:
            return
        bounds, delays, sent_at = self._bounds, self._delays, self._sent_at
        for date, count in dates.items():
            delay = date - sent_at
            if delay < 0:
                if delay <= -DATE_RESOLUTION:
                    self._skewed += count
                delay = 0.0
            delays[bisect.bisect_left(bounds, delay)] += count
            self._delay_sum += delay * count

    def result(self) -> MessageAggregate:
        states = dict.fromkeys(State, 0)
        statuses: dict[str, int] = {}
        for raw, count in self._raw.items():
            states[self._status_map.state_of(raw)] += count
            name = raw.lower()
            statuses[name] = statuses.get(name, 0) + count
        for state, count in self._overflow.items():
            states[state] += count
        capped = _cap(statuses, self._max_statuses, sum(self._overflow.values()))
        return MessageAggregate(
            states=_shared(_STATES, tuple(states.items()), MappingProxyType(states)),
            statuses=_shared(_STATUSES, tuple(capped.items()), MappingProxyType(capped)),
            cost=self._cost,
            unsubscribed=self._unsubscribed,
            last_report=self._last,
            delays=_shared(_DELAYS, tuple(self._delays), tuple(self._delays)),
            delay_sum=self._delay_sum,
            skewed=self._skewed,
        )


# Counts that many messages have alike (a transactional stream: thousands of one-recipient
# messages, each "1 delivered") are kept once: memory follows the distinct counts, not the
# messages. Each table is cleared when full, so unique counts cannot grow it without end.
_MAX_SHARED = 4096
_STATES: dict[tuple[tuple[State, int], ...], Mapping[State, int]] = {}
_STATUSES: dict[tuple[tuple[str, int], ...], Mapping[str, int]] = {}
_DELAYS: dict[tuple[int, ...], tuple[int, ...]] = {}
T = TypeVar("T")
K = TypeVar("K")


def _shared(table: dict[K, T], key: K, value: T) -> T:
    shared = table.get(key)
    if shared is None:
        if len(table) >= _MAX_SHARED:
            table.clear()
        shared = table[key] = value
    return shared


def _cap(statuses: dict[str, int], limit: int, overflow: int) -> dict[str, int]:
    """Keep the ``limit - 1`` most common statuses and fold the rest into ``other``.

    Ties break on the name so the same response always yields the same series.
    """
    if len(statuses) <= limit and not overflow:
        return dict(sorted(statuses.items()))
    ranked = sorted(statuses.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ranked[: limit - 1])
    folded = overflow + sum(count for _, count in ranked[limit - 1 :])
    if OTHER_STATUS in kept:
        folded += kept.pop(OTHER_STATUS)
    kept[OTHER_STATUS] = folded
    return dict(sorted(kept.items()))
