"""The status page's summary: the API's health, the request budget, the account's credits and
the tracked messages by phase.

Read from the series ``/metrics`` serves, through the same collectors in process, so the page
and a scrape never disagree::

    mailpartner_up 1.0
    mailpartner_exporter_scheduled_requests_per_minute 27.5
    mailpartner_exporter_request_budget_per_minute 600.0
    mailpartner_account_credits{field="creditMail"} 95106.0
    mailpartner_exporter_messages{phase="active"} 12.0
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client.registry import Collector

# The families read, by the name their collector gives them (a counter's without _total).
_UP = "mailpartner_up"
_REQUESTS = "mailpartner_api_requests"
_ERRORS = "mailpartner_api_errors"
_FAILURES = "mailpartner_api_request_failures"
_BUDGET = "mailpartner_exporter_request_budget_per_minute"
_SCHEDULED = "mailpartner_exporter_scheduled_requests_per_minute"
_CREDITS = "mailpartner_account_credits"
_LOW_CREDITS = "mailpartner_account_credits_low_threshold"
_PHASES = "mailpartner_exporter_messages"
_READ = {
    _UP,
    _REQUESTS,
    _ERRORS,
    _FAILURES,
    _BUDGET,
    _SCHEDULED,
    _CREDITS,
    _LOW_CREDITS,
    _PHASES,
}
# The request rate is measured over the minute before the page is viewed, from the request
# count seen at earlier views (and at start). Enough of them for a page reloaded every 60 ms.
_WINDOW = 60.0
_KEPT_COUNTS = 1000
_RATE_LIMITED = "429"
# Each family's samples read: (labels, value).
Series = Mapping[str, list[tuple[Mapping[str, str], float]]]


@dataclass(frozen=True)
class RecentRequests:
    """Requests sent to the API in the ``seconds`` before now."""

    count: float
    seconds: float

    @property
    def per_minute(self) -> float:
        return self.count * 60.0 / self.seconds


@dataclass(frozen=True)
class StatusSummary:
    """What the top of the status page says."""

    up: bool | None  # mailpartner_up; None before the first request
    recent: RecentRequests | None  # None until a second has passed
    errors: Mapping[str, int]  # error codes (``code 10``) and failure reasons, since start
    rate_limited: int  # 429 answers since start: each paused every poll of the API
    budget: float | None  # absent without the bulk_status source
    scheduled: float | None
    credits: Mapping[str, float] | None  # None: the account source is off
    low_credits: Mapping[str, float]
    phases: Mapping[str, int] | None  # in the collector's order; None: no bulk_status source


class SummaryReader:
    """Reads a ``StatusSummary`` from ``registry``; keeps the request counts it saw, for a rate."""

    def __init__(self, registry: Collector, clock: Callable[[], float]) -> None:
        self._registry = registry
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: deque[tuple[float, float]] = deque(maxlen=_KEPT_COUNTS)  # (when, total)
        self._recent(self._read())

    def __call__(self) -> StatusSummary:
        series = self._read()
        recent = self._recent(series)
        errors: dict[str, int] = {}
        rate_limited = 0
        for labels, value in series.get(_ERRORS, ()):
            if labels["code"] == _RATE_LIMITED:
                rate_limited += int(value)
            elif value:
                code = f"code {labels['code']}"
                errors[code] = errors.get(code, 0) + int(value)
        for labels, value in series.get(_FAILURES, ()):
            if value:
                errors[labels["reason"]] = errors.get(labels["reason"], 0) + int(value)
        up = _one(series, _UP)
        return StatusSummary(
            up=None if up is None or not _total(series, _REQUESTS) else up == 1,
            recent=recent,
            errors=errors,
            rate_limited=rate_limited,
            budget=_one(series, _BUDGET),
            scheduled=_one(series, _SCHEDULED),
            credits=_by_field(series, _CREDITS) if _CREDITS in series else None,
            low_credits=_by_field(series, _LOW_CREDITS),
            phases=_by_phase(series) if _PHASES in series else None,
        )

    def _read(self) -> Series:
        series: dict[str, list[tuple[Mapping[str, str], float]]] = {}
        for metric in self._registry.collect():
            if metric.name in _READ:
                names = (metric.name, f"{metric.name}_total")  # not a counter's _created
                found = series.setdefault(metric.name, [])
                found.extend((s.labels, s.value) for s in metric.samples if s.name in names)
        return series

    def _recent(self, series: Series) -> RecentRequests | None:
        now, total = self._clock(), _total(series, _REQUESTS)
        with self._lock:
            counts = self._counts
            while counts and counts[-1][0] > now:  # the clock was set back: start again
                counts.pop()
            counts.append((now, total))
            # The newest count a minute old or more is where the window starts.
            while len(counts) > 1 and counts[1][0] <= now - _WINDOW:
                counts.popleft()
            then, before = counts[0]
        return RecentRequests(total - before, now - then) if now - then >= 1.0 else None


def _total(series: Series, name: str) -> float:
    return sum(value for _, value in series.get(name, ()))


def _one(series: Series, name: str) -> float | None:
    values = series.get(name)
    return values[0][1] if values else None


def _by_field(series: Series, name: str) -> dict[str, float]:
    return {labels["field"]: value for labels, value in series.get(name, ())}


def _by_phase(series: Series) -> dict[str, int]:
    return {labels["phase"]: int(value) for labels, value in series.get(_PHASES, ())}
