"""One API as the poll loop and the probes see it: its client, request budget, concurrency
and 429 pause.

Each API the exporter talks to (Mail Partner, and SMS Partner when its source is on) is one
``Upstream``. Every request to it, from the poll loop or from ``/probe``, takes a token from
its bucket first, and a 429 from any of them pauses all of them: the limit is per IP address.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable

import requests

from exporter import __version__
from exporter.client import MailPartnerClient, PollError
from exporter.config.model import ApiConfig
from exporter.secret import Redactor
from exporter.stats import RequestStats

log = logging.getLogger(__name__)
Clock = Callable[[], float]
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


class Upstream:
    """One API as the poller sees it: its client, request budget, concurrency and 429 pause.

    ``lock`` guards ``in_flight`` and the bucket; sources read ``client`` and ``api``.
    """

    def __init__(
        self, api: ApiConfig, client: MailPartnerClient, stats: RequestStats, now: float
    ) -> None:
        self.api = api
        self.client = client
        self.stats = stats  # what the client counts: the API's series
        self.bucket = _bucket(api, now)
        self.in_flight = 0
        self.rate_limited = 0  # consecutive 429s
        self.lock = threading.Lock()
        self._budget = threading.Condition(self.lock)
        # Clients a reload replaced, while a request of theirs may still run.
        self._replaced: weakref.WeakSet[MailPartnerClient] = weakref.WeakSet()

    def take(self, deadline: float, clock: Clock = time.time) -> bool:
        """Wait until the budget allows one request, or ``deadline``; True if it did.

        For requests made outside the poll loop (``/probe``): they spend the same budget.
        """
        with self._budget:
            while True:
                now = clock()
                if self.bucket.try_take(now):
                    return True
                wait = self.bucket.wait_time(now)
                if now + wait > deadline:
                    return False
                self._budget.wait(wait)

    def answered(self, error: PollError | None, now: float) -> None:
        """A request ended (``error`` None if it went through). A 429 pauses every request to
        this API, not just one poll, for its Retry-After or 5 s doubling while 429s go on."""
        if error is None:
            self.rate_limited = 0
            return
        if not error.rate_limited:
            return
        with self.lock:
            self.rate_limited += 1
            retry_after = error.retry_after
            if retry_after is None:
                retry_after = RATE_LIMIT_PAUSE * 2 ** min(self.rate_limited - 1, 8)
            pause = min(retry_after, MAX_RATE_LIMIT_PAUSE)
            self.bucket.hold(now + pause)
        log.warning("rate limited: pausing all polls", extra={"seconds": round(pause, 1)})

    def abort(self) -> None:
        """Cut off every request in flight to this API, and refuse new ones (shutdown)."""
        with self.lock:
            clients = [self.client, *self._replaced]
        for client in clients:
            client.abort()

    def reconfigure(self, api: ApiConfig, client: MailPartnerClient, now: float) -> None:
        with self.lock:
            if client is not self.client:
                self._replaced.add(self.client)
            old, self.api, self.client = self.api, api, client
            if (old.max_requests_per_minute, old.concurrency) != (
                api.max_requests_per_minute,
                api.concurrency,
            ):
                self.bucket = _bucket(api, now)


def _bucket(api: ApiConfig, now: float) -> TokenBucket:
    return TokenBucket(api.max_requests_per_minute, api.concurrency, now)


def open_client(api: ApiConfig, stats: RequestStats) -> MailPartnerClient:
    """A client for ``api`` on a session of its own (keep-alive; the client sizes its pool)."""
    session = requests.Session()
    session.headers["User-Agent"] = f"mailpartner-exporter/{__version__}"
    return MailPartnerClient(api, session, stats, Redactor(api.api_key))


def connect(api: ApiConfig, stats: RequestStats) -> Upstream:
    """``api`` as an ``Upstream`` of its own: its client, budget and 429 pause."""
    return Upstream(api, open_client(api, stats), stats, time.time())
