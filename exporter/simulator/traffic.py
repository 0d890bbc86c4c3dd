"""Bookkeeping of the simulator's ``/v1`` traffic: the per-IP rate limit and request stats."""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

# Enough for any test's budget check while keeping a week-long demo's memory flat.
MAX_REQUEST_TIMES = 100_000


@dataclass(frozen=True)
class SimulatorStats:
    """Every ``/v1`` request received, including rejected ones (bad key, rate-limited, faults).

    ``request_times`` holds world-clock times in arrival order (the most recent
    ``MAX_REQUEST_TIMES``), and ``log`` the same requests as (time, endpoint, message ID or
    ""); ``polls`` counts bulk-status requests per ``messageId`` asked for.
    """

    requests: Mapping[str, int]
    request_times: tuple[float, ...]
    log: tuple[tuple[float, str, str], ...]
    polls: Mapping[str, int]
    max_in_flight: int


class TrafficRecorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._times: deque[float] = deque(maxlen=MAX_REQUEST_TIMES)
        self._log: deque[tuple[float, str, str]] = deque(maxlen=MAX_REQUEST_TIMES)
        self._polls: Counter[str] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0

    @contextmanager
    def serving(self, endpoint: str, at: float, message_id: str | None) -> Iterator[None]:
        with self._lock:
            self._requests[endpoint] += 1
            self._times.append(at)
            self._log.append((at, endpoint, message_id or ""))
            if message_id:
                self._polls[message_id] += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def snapshot(self) -> SimulatorStats:
        with self._lock:
            return SimulatorStats(
                requests=dict(self._requests),
                request_times=tuple(self._times),
                log=tuple(self._log),
                polls=dict(self._polls),
                max_in_flight=self._max_in_flight,
            )


class SlidingWindowLimiter:
    """At most ``limit`` admitted requests per client in any ``window`` seconds.

    Only admitted requests fill the window: a client that is refused and backs off gets
    through again once its oldest admitted request is ``window`` seconds old, however
    often it was refused meanwhile.
    """

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self._limit = limit
        self._window = window
        self._lock = threading.Lock()
        self._admitted: dict[str, deque[float]] = {}

    def admit(self, client: str, now: float) -> bool:
        with self._lock:
            times = self._admitted.setdefault(client, deque())
            while times and times[0] <= now - self._window:
                times.popleft()
            if len(times) >= self._limit:
                return False
            times.append(now)
            return True
