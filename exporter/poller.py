"""The background loop: run every source's due polls within its API's budget and concurrency.

Each API the exporter talks to is an ``Upstream`` (``exporter.upstream``): its client, its
token bucket (``max_requests_per_minute``), its concurrency and its 429 pause. Sources say
what is due; the poller decides what runs now.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING

from exporter.client import PollError
from exporter.upstream import Clock, Upstream

if TYPE_CHECKING:
    from exporter.sources.base import Poll, Source

log = logging.getLogger(__name__)
# Longest the loop sleeps with nothing due, so a clock jump is noticed.
_IDLE_WAIT = 5.0


class Poller:
    """Dispatches due polls; ``run_pending`` is one step, ``run`` loops until stopped."""

    def __init__(
        self,
        sources: Sequence[Source],
        clock: Clock = time.time,
        executor: Executor | None = None,
    ) -> None:
        self._sources = tuple(sources)
        self._clock = clock
        self._owns_executor = executor is None
        self._workers = _workers(self._sources)
        self._executor = executor or _pool(self._workers)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified as each poll ends
        self._in_flight = 0
        self._wake = threading.Event()
        # When each source last had a poll started (a count of turns): the next turn is
        # the source served longest ago.
        self._served: dict[Source, int] = {}
        self._turns = 0

    @property
    def sources(self) -> tuple[Source, ...]:
        return self._sources

    def reconfigure(self, sources: Sequence[Source]) -> None:
        """Poll ``sources`` from now on; polls in flight finish as they are."""
        with self._lock:
            self._sources = tuple(sources)
            self._served = {s: n for s, n in self._served.items() if s in self._sources}
            workers = _workers(self._sources)
            if self._owns_executor and workers > self._workers:
                self._executor.shutdown(wait=False)
                self._executor = _pool(workers)
                self._workers = workers
        self._wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for polls in flight to end; True if they all did."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def run_pending(self) -> float:
        """Start every due poll that the budgets and concurrency allow.

        Returns how long to wait before there may be more to do.
        """
        now = self._clock()
        sources = self._sources
        for source in sources:
            source.tick(now)
        wait = _IDLE_WAIT
        for upstream, group in _by_upstream(sources).items():
            wait = min(wait, self._run_upstream(upstream, group, now))
        return wait

    def _run_upstream(self, upstream: Upstream, sources: list[Source], now: float) -> float:
        with upstream.lock:
            room = min(
                upstream.api.concurrency - upstream.in_flight, upstream.bucket.available(now)
            )
        # Sources with something due take turns, the one served longest ago first: the
        # account poll never waits behind a backlog of message polls. Each gets its share
        # of the room, then what is left goes round again.
        ready = [s for s in sources if (t := s.next_due()) is not None and t <= now]
        ready.sort(key=lambda source: self._served.get(source, -1))
        share = max(1, room // len(ready)) if ready else 0
        for turn in (share, room):
            for source in ready:
                if room < 1:
                    break
                due = source.due(now, min(turn, room))
                for started, poll in enumerate(due):
                    wait = self._dispatch(upstream, poll, now)
                    if wait is not None:  # a 429 paused everything, or a poll took the room
                        source.requeue(due[started:])
                        return wait
                if due:
                    self._turns += 1
                    self._served[source] = self._turns
                room -= len(due)
        upcoming = min((t for s in sources if (t := s.next_due()) is not None), default=None)
        if upcoming is None:
            return _IDLE_WAIT
        if upcoming <= now:  # more is due than can start now
            with upstream.lock:
                if upstream.in_flight >= upstream.api.concurrency:
                    return _IDLE_WAIT  # a finishing poll wakes the loop sooner
                return upstream.bucket.wait_time(now)
        return min(_IDLE_WAIT, upcoming - now)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set. Nothing a poll does can end this loop."""
        while not stop.is_set():
            try:
                wait = self.run_pending()
            except Exception:
                log.exception("poll loop step failed; continuing")
                wait = _IDLE_WAIT
            self._wake.wait(wait)
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def poll_all(self) -> bool:
        """Poll everything every source would poll, once (``--once``); True if all succeeded."""
        outcomes: list[bool] = []
        for source in self._sources:
            for poll in source.everything(self._clock()):
                while (
                    wait := self._dispatch(source.upstream, poll, self._clock(), outcomes)
                ) is not None:
                    with self._idle:
                        self._idle.wait(wait)
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)
        return all(outcomes)

    def _dispatch(
        self, upstream: Upstream, poll: Poll, now: float, outcomes: list[bool] | None = None
    ) -> float | None:
        """Start ``poll`` if concurrency and budget allow; else how long to wait."""
        with upstream.lock:
            if upstream.in_flight >= upstream.api.concurrency:
                return _IDLE_WAIT  # a finishing poll wakes the loop sooner
            if not upstream.bucket.try_take(now):
                return upstream.bucket.wait_time(now)
            started = poll.start(now)
            if started:
                upstream.in_flight += 1
        if started:
            with self._lock:
                self._in_flight += 1
            self._executor.submit(self._run, upstream, poll, outcomes)
        return None

    def _run(self, upstream: Upstream, poll: Poll, outcomes: list[bool] | None) -> None:
        ok = False
        try:
            poll.run()
        except PollError as e:
            upstream.answered(e, self._clock())
        except Exception as e:  # a bug must cost one poll, not the loop
            log.exception("poll crashed", extra={"subject": poll.subject})
            poll.crashed(e)
        else:
            ok = True
            upstream.answered(None, self._clock())
        finally:
            with upstream.lock:
                upstream.in_flight -= 1
            with self._idle:
                self._in_flight -= 1
                if outcomes is not None:
                    outcomes.append(ok)
                self._idle.notify_all()
            self._wake.set()


def _by_upstream(sources: Sequence[Source]) -> dict[Upstream, list[Source]]:
    groups: dict[Upstream, list[Source]] = {}
    for source in sources:
        groups.setdefault(source.upstream, []).append(source)
    return groups


def _workers(sources: Sequence[Source]) -> int:
    return sum(u.api.concurrency for u in _by_upstream(sources)) or 1


def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="poll")
