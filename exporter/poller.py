"""The background loop: poll due messages within the request budget and concurrency."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor

from exporter.aggregate import ReportAggregator
from exporter.client import MailPartnerClient, PollError
from exporter.config import Config
from exporter.tracker import MessageBook, Phase, TrackedMessage

log = logging.getLogger(__name__)
Clock = Callable[[], float]
# Longest the loop sleeps with nothing due, so a clock jump is noticed.
_IDLE_WAIT = 5.0
# After a 429 without Retry-After, all polls pause this long, doubling while 429s go on.
RATE_LIMIT_PAUSE = 5.0
MAX_RATE_LIMIT_PAUSE = 600.0


class TokenBucket:
    """At most ``per_minute`` takes in any 60-second window, in bursts of ``burst``.

    Refilling at ``(per_minute - capacity + 1) / 60`` per second keeps a full
    bucket plus a minute's refill at exactly ``per_minute`` in any half-open
    60 s window, so the budget holds without a log of timestamps. The burst is
    kept under a tenth of the budget so the steady rate stays close to it.
    """

    def __init__(self, per_minute: int, burst: int, now: float) -> None:
        self.capacity = float(max(1, min(burst, per_minute // 10)))
        self.rate = (per_minute - self.capacity + 1) / 60.0
        self._tokens = self.capacity
        self._stamp = now
        self._held_until = now

    def hold(self, until: float) -> None:
        """Allow no take before ``until`` (the upstream said to slow down)."""
        self._held_until = max(self._held_until, until)

    def _refill(self, now: float) -> None:
        # A wall clock stepped backwards only restarts the refill from there.
        self._tokens = min(self.capacity, self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = now

    def available(self, now: float) -> int:
        """How many takes would succeed right now."""
        self._refill(now)
        return 0 if now < self._held_until else int(self._tokens)

    def try_take(self, now: float) -> bool:
        self._refill(now)
        if now >= self._held_until and self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_time(self, now: float) -> float:
        """Seconds until a take can succeed."""
        self._refill(now)
        return max(0.0, (1.0 - self._tokens) / self.rate, self._held_until - now)


class Poller:
    """Dispatches due polls; ``run_pending`` is one step, ``run`` loops until stopped."""

    def __init__(
        self,
        config: Config,
        book: MessageBook,
        client: MailPartnerClient,
        clock: Clock = time.time,
        executor: Executor | None = None,
    ) -> None:
        self._config = config
        self._book = book
        self._client = client
        self._clock = clock
        self._owns_executor = executor is None
        self._executor = executor or _pool(config.api.concurrency)
        self._bucket = _bucket(config, clock())
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified as each poll ends
        self._in_flight = 0
        self._rate_limited = 0  # consecutive 429s
        self._wake = threading.Event()

    def reconfigure(self, config: Config, client: MailPartnerClient) -> None:
        """Poll with ``config`` and ``client`` from now on; polls in flight finish as they are."""
        with self._lock:
            old = self._config.api
            self._config, self._client = config, client
            new = config.api
            if (old.max_requests_per_minute, old.concurrency) != (
                new.max_requests_per_minute,
                new.concurrency,
            ):
                self._bucket = _bucket(config, self._clock())
            if self._owns_executor and new.concurrency > old.concurrency:
                self._executor.shutdown(wait=False)
                self._executor = _pool(new.concurrency)
        self._wake.set()

    @property
    def client(self) -> MailPartnerClient:
        return self._client

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for polls in flight to end; True if they all did."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def run_pending(self) -> float:
        """Start every due poll that the budget and concurrency allow.

        Returns how long to wait before there may be more to do.
        """
        now = self._clock()
        for message_id in self._book.expire(now):
            log.info("message past retention, no longer exposed", extra={"message_id": message_id})
        with self._lock:
            room = min(self._config.api.concurrency - self._in_flight, self._bucket.available(now))
        due = self._book.due(now, max(0, room))
        for started, message in enumerate(due):
            wait = self._dispatch(message, now)
            if wait is not None:  # a 429 during this batch paused everything
                self._book.requeue(due[started:])
                return wait
        upcoming = self._book.next_poll()
        if upcoming is None:
            return _IDLE_WAIT
        if upcoming <= now:  # more is due than can start now
            with self._lock:
                if self._in_flight >= self._config.api.concurrency:
                    return _IDLE_WAIT  # a finishing poll wakes the loop sooner
                return self._bucket.wait_time(now)
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
        """Poll every message not yet final once (``--once``); True if all succeeded."""
        messages, _ = self._book.snapshot()
        wanted = {m.spec.id for m in messages if m.phase != Phase.FINAL}
        for message in messages:
            if message.spec.id not in wanted:
                continue
            while (wait := self._dispatch(message, self._clock())) is not None:
                with self._idle:
                    self._idle.wait(wait)
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)
        polled, _ = self._book.snapshot()
        return all(m.poll_ok for m in polled if m.spec.id in wanted)

    def _dispatch(self, message: TrackedMessage, now: float) -> float | None:
        """Start polling ``message`` if concurrency and budget allow; else how long to wait."""
        with self._lock:
            if self._in_flight >= self._config.api.concurrency:
                return _IDLE_WAIT  # a finishing poll wakes the loop sooner
            if not self._bucket.try_take(now):
                return self._bucket.wait_time(now)
            started = self._book.start_poll(message.spec.id, now)
            if started:
                self._in_flight += 1
        if started:
            self._executor.submit(self._poll, message)
        return None

    def _back_off(self, retry_after: float | None) -> None:
        """A 429 pauses every poll, not just this message's: the limit is per IP."""
        with self._lock:
            self._rate_limited += 1
            if retry_after is None:
                retry_after = RATE_LIMIT_PAUSE * 2 ** min(self._rate_limited - 1, 8)
            pause = min(retry_after, MAX_RATE_LIMIT_PAUSE)
            self._bucket.hold(self._clock() + pause)
        log.warning("rate limited: pausing all polls", extra={"seconds": round(pause, 1)})

    def _poll(self, message: TrackedMessage) -> bool:
        message_id = message.spec.id
        try:
            aggregate = self._client.bulk_status(
                message_id, ReportAggregator(self._config.status_map)
            )
        except PollError as e:
            if e.rate_limited:
                self._back_off(e.retry_after)
            self._book.record_failure(message_id, str(e), self._clock())
            level = logging.DEBUG if message.last_error else logging.WARNING
            log.log(level, "poll failed", extra={"message_id": message_id, "err": str(e)})
            return False
        except Exception as e:  # a bug must cost one poll, not the loop
            log.exception("poll crashed", extra={"message_id": message_id})
            self._book.record_failure(
                message_id, f"internal error: {type(e).__name__}", self._clock()
            )
            return False
        else:
            self._rate_limited = 0
            self._book.record_success(message_id, aggregate, self._clock())
            if message.last_error:
                log.info("poll recovered", extra={"message_id": message_id})
            return True
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
            self._wake.set()


def _pool(concurrency: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(concurrency, thread_name_prefix="poll")


def _bucket(config: Config, now: float) -> TokenBucket:
    return TokenBucket(config.api.max_requests_per_minute, config.api.concurrency, now)
