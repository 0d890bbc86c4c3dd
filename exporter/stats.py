"""Counters of API requests, kept by the client and rendered by the collector."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
KNOWN_CODES = ("1", "3", "4", "10", "429")
KNOWN_REASONS = ("timeout", "connection", "invalid_response")


@dataclass(frozen=True)
class Histogram:
    buckets: tuple[int, ...]  # non-cumulative counts per DURATION_BUCKETS, then +Inf
    total: float


@dataclass(frozen=True)
class RequestStatsSnapshot:
    requests: Mapping[str, int]
    errors: Mapping[tuple[str, str], int]
    failures: Mapping[tuple[str, str], int]
    durations: Mapping[str, Histogram]
    up: bool


class RequestStats:
    """Thread-safe tallies; ``snapshot()`` copies them for one scrape."""

    def __init__(self, endpoints: Iterable[str]) -> None:
        self._lock = threading.Lock()
        endpoints = tuple(endpoints)
        self._requests = dict.fromkeys(endpoints, 0)
        self._errors = {(e, c): 0 for e in endpoints for c in KNOWN_CODES}
        self._failures = {(e, r): 0 for e in endpoints for r in KNOWN_REASONS}
        self._buckets = {e: [0] * (len(DURATION_BUCKETS) + 1) for e in endpoints}
        self._seconds = dict.fromkeys(endpoints, 0.0)
        self._up: dict[str, bool] = {}  # each endpoint's last request went through

    def request_started(self, endpoint: str) -> None:
        with self._lock:
            self._requests[endpoint] = self._requests.get(endpoint, 0) + 1

    def request_finished(
        self, endpoint: str, seconds: float, error: str | None, *, up: bool, api_error: bool = False
    ) -> None:
        with self._lock:
            buckets = self._buckets.setdefault(endpoint, [0] * (len(DURATION_BUCKETS) + 1))
            buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
            self._seconds[endpoint] = self._seconds.get(endpoint, 0.0) + seconds
            if error is not None:
                tally = self._errors if api_error else self._failures
                tally[(endpoint, error)] = tally.get((endpoint, error), 0) + 1
            self._up[endpoint] = up

    def snapshot(self) -> RequestStatsSnapshot:
        with self._lock:
            return RequestStatsSnapshot(
                requests=dict(self._requests),
                errors=dict(self._errors),
                failures=dict(self._failures),
                durations={
                    e: Histogram(tuple(b), self._seconds[e]) for e, b in self._buckets.items()
                },
                # Every endpoint's last request: /v1/me answering every few minutes must
                # not hide bulk-status failing (or the other way round).
                up=bool(self._up) and all(self._up.values()),
            )
