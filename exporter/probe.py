"""``/probe?message_id=ID``: one message polled at scrape time, blackbox-exporter style.

The poll has what is left of the scrape (``X-Prometheus-Scrape-Timeout-Seconds``, less a
margin for the answer's way back) to get a token from the same request budget as the
background polls and to finish. Answers are kept for the source's ``probe_cache`` (1 minute
unless set): a second Prometheus replica, or a second scrape of the same message, within that
time gets the same answer without a request; two probes of one message at once make one
request, and a message the exporter tracks anyway is answered from its last poll while that
is as fresh.

Sample exposition::

    mailpartner_message_recipients{message_id="300",state="delivered"} 118.0
    mailpartner_probe_success 1.0
    mailpartner_probe_duration_seconds 0.042
"""

from __future__ import annotations

import math
import operator
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from exporter.aggregate import MessageAggregate, ReportAggregator
from exporter.client import PollError, RequestAborted
from exporter.collector import MessageView, message_families, message_samples
from exporter.config.errors import ConfigErrors
from exporter.config.reader import parse_message
from exporter.domain import MessageSpec
from exporter.exposition import FixedMetrics, gauge
from exporter.sources.bulk_status import PROBE_CACHE, BulkStatusSource
from exporter.upstream import TokenBucket
from exporter.wsgi import StartResponse, WSGIApp, respond

_AT = operator.attrgetter("at")
MAX_CACHED = 10_000  # messages whose last probe is kept
# Prometheus' own default scrape timeout, for a caller that does not say.
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 120.0
# Left for the answer to reach Prometheus before its timeout.
MARGIN = 0.5
# Probes of messages the exporter does not track spend at most this share of the request
# budget: a caller trying random IDs cannot hold up the background polls.
UNTRACKED_SHARE = 0.1


@dataclass(frozen=True)
class ProbeResult:
    spec: MessageSpec
    at: float  # when the probe ended
    success: bool
    duration: float
    aggregate: MessageAggregate | None  # this probe's, or the last good one's
    last_success: float | None
    error: str = ""


class Prober:
    """Probes of one bulk-status source's messages, cached and merged."""

    def __init__(
        self, source: BulkStatusSource, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._source = source
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, ProbeResult] = OrderedDict()
        self._running: dict[str, threading.Event] = {}
        self._untracked: tuple[int, TokenBucket] | None = None  # (per minute, its bucket)

    def probe(self, message_id: str, timeout: float) -> ProbeResult:
        """``message_id`` polled now, or as a poll within ``probe_cache`` found it."""
        clock = self._source.context.clock
        deadline = clock() + max(0.0, timeout - MARGIN)
        while True:
            with self._lock:
                found = [self._cache.get(message_id), self._tracked(message_id)]
                cached = max((r for r in found if r), key=_AT, default=None)
                if cached is not None and clock() - cached.at < self._cache_for():
                    if message_id in self._cache:
                        self._cache.move_to_end(message_id)
                    return cached
                running = self._running.get(message_id)
                if running is None:
                    done = self._running[message_id] = threading.Event()
                    break
            # Another probe of this message is polling: share its answer.
            if not running.wait(max(0.0, deadline - clock())):
                return self._failed(message_id, cached, 0.0, "another probe did not finish in time")
        try:
            result = self._poll(message_id, deadline, cached)
        finally:
            with self._lock:
                del self._running[message_id]
            done.set()
        with self._lock:
            self._cache[message_id] = result
            self._cache.move_to_end(message_id)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return result

    def _cache_for(self) -> float:
        return float(self._source.settings.get("probe_cache", PROBE_CACHE))

    def _tracked(self, message_id: str) -> ProbeResult | None:
        """A tracked message's last successful poll, as if a probe had made it."""
        message = self._source.book.get(message_id)
        if message is None or message.last_success is None or not message.poll_ok:
            return None
        return ProbeResult(
            message.spec,
            message.last_success,
            True,
            0.0,
            message.aggregate,
            message.last_success,
        )

    def _poll(self, message_id: str, deadline: float, previous: ProbeResult | None) -> ProbeResult:
        source = self._source
        clock = source.context.clock
        started = self._monotonic()
        upstream = source.upstream
        if source.book.get(message_id) is None and not self._untracked_allowed(clock()):
            per_minute = _untracked_budget(upstream.api.max_requests_per_minute)
            return self._failed(
                message_id,
                previous,
                0.0,
                f"probes of messages not tracked here are limited to {per_minute} requests a"
                " minute (a tenth of api.max_requests_per_minute)",
            )
        if not upstream.take(deadline, clock):
            return self._failed(
                message_id, previous, 0.0, "the request budget allows no request in time"
            )
        try:
            aggregate = upstream.client.bulk_status(
                message_id,
                ReportAggregator(source.context.config.status_map),
                source.shape,
                timeout=max(0.001, deadline - clock()),
            )
        except PollError as e:
            upstream.answered(e, clock())
            return self._failed(message_id, previous, self._monotonic() - started, str(e))
        now = clock()
        upstream.answered(None, now)
        return ProbeResult(
            self._spec(message_id), now, True, self._monotonic() - started, aggregate, now
        )

    def _untracked_allowed(self, now: float) -> bool:
        per_minute = _untracked_budget(self._source.upstream.api.max_requests_per_minute)
        with self._lock:
            if self._untracked is None or self._untracked[0] != per_minute:  # budget reloaded
                self._untracked = (per_minute, TokenBucket(per_minute, per_minute, now))
            return self._untracked[1].try_take(now)

    def _failed(
        self, message_id: str, previous: ProbeResult | None, duration: float, error: str
    ) -> ProbeResult:
        return ProbeResult(
            self._spec(message_id),
            self._source.context.clock(),
            False,
            duration,
            previous.aggregate if previous else None,
            previous.last_success if previous else None,
            error,
        )

    def _spec(self, message_id: str) -> MessageSpec:
        """A tracked message keeps its labels; any other has its ID alone."""
        tracked = self._source.book.get(message_id)
        return tracked.spec if tracked is not None else MessageSpec(message_id)


def render(result: ProbeResult, prefix: str) -> bytes:
    """The probe's answer in the text format: the message's series, then the probe's."""
    view = MessageView(
        result.spec,
        result.aggregate,
        result.spec.sent_at,
        False,
        result.success,
        result.last_success,
        None,
    )
    metrics: list[Metric] = []
    if result.aggregate is not None:
        for (name, help_text), samples in zip(
            message_families(prefix), message_samples(view), strict=True
        ):
            metric = Metric(name, help_text, "gauge")
            for labels, value in samples:
                metric.add_sample(name, dict(labels), value)
            metrics.append(metric)
    metrics.append(
        gauge(f"{prefix}_probe_success", "1 if the probe's poll succeeded.", result.success)
    )
    metrics.append(
        gauge(
            f"{prefix}_probe_duration_seconds",
            "How long the poll behind this answer took (a cached answer keeps its poll's).",
            result.duration,
        )
    )
    return generate_latest(FixedMetrics(metrics))


def probe_app(
    sources: Callable[[], Mapping[str, BulkStatusSource]],
) -> WSGIApp:
    """The WSGI app behind ``/probe?message_id=ID[&source=NAME]``."""
    probers: weakref.WeakKeyDictionary[BulkStatusSource, Prober] = weakref.WeakKeyDictionary()
    lock = threading.Lock()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        query = parse_qs(environ.get("QUERY_STRING") or "")
        name = query.get("source", ["bulk_status"])[0]
        source = sources().get(name)
        if source is None:
            return respond(start_response, "400 Bad Request", f"source {name!r} is not enabled\n")
        try:
            spec, _ = parse_message({"id": query.get("message_id", [""])[0]}, "message_id")
        except ConfigErrors:
            return respond(
                start_response,
                "400 Bad Request",
                "message_id must be 1 to 128 characters without spaces, control or bidirectional"
                " characters\n",
            )
        with lock:
            prober = probers.get(source)
            if prober is None:
                prober = probers[source] = Prober(source)
        try:
            result = prober.probe(spec.id, _timeout(environ))
        except RequestAborted:  # the exporter is stopping
            return respond(start_response, "503 Service Unavailable", "shutting down\n")
        body = render(result, source.prefix)
        return respond(start_response, "200 OK", body, CONTENT_TYPE_PLAIN_0_0_4)

    return app


def _untracked_budget(per_minute: int) -> int:
    return max(1, int(per_minute * UNTRACKED_SHARE))


def _timeout(environ: Mapping[str, Any]) -> float:
    """The scrape's timeout as Prometheus sends it; Prometheus' default if absent or odd."""
    try:
        seconds = float(environ.get("HTTP_X_PROMETHEUS_SCRAPE_TIMEOUT_SECONDS", ""))
    except ValueError:
        return DEFAULT_TIMEOUT
    return min(seconds, MAX_TIMEOUT) if math.isfinite(seconds) and seconds > 0 else DEFAULT_TIMEOUT
