"""Every metric the exporter exposes is named here, built fresh on each scrape.

Sample exposition::

    mailpartner_message_recipients{campaign="newsletter",message_id="300",state="delivered"} 2.0
    mailpartner_recipients_total{state="delivered"} 2.0
    mailpartner_api_errors_total{code="10",endpoint="bulk-status"} 0.0
"""

from __future__ import annotations

import bisect
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.aggregate import MessageAggregate
from exporter.config import MessageSpec, State
from exporter.config.holder import ConfigHolder
from exporter.exposition import MessageLines, Samples
from exporter.stats import DURATION_BUCKETS, RequestStats
from exporter.tracker import MessageBook, Phase, TrackedMessage

# A poll this late is not just waiting for the loop's next turn: the budget or
# the concurrency cannot keep up with the schedule.
OVERDUE_AFTER = 5.0
_BY_ID = operator.attrgetter("spec.id")
_PHASE = operator.attrgetter("phase")


class MailPartnerCollector(Collector):
    def __init__(
        self,
        book: MessageBook,
        stats: RequestStats,
        holder: ConfigHolder,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._book = book
        self._stats = stats
        self._holder = holder
        self._clock = clock
        self._lines = MessageLines(MESSAGE_FAMILIES, message_view, message_samples)
        self._summary = _summarize(())

    def collect(self) -> Iterator[Metric]:
        messages, totals = self._book.snapshot()
        summary = self._summary
        if summary.messages != messages:  # the same objects: a pointer check per message
            summary = self._summary = _summarize(messages)
        # Built lazily: the fast path (exporter.exposition) reads their cached lines instead.
        yield from self._lines.metrics(summary.by_id)

        recipients = Metric(
            "mailpartner_recipients",
            "Recipients observed reaching each state over the exporter's life.",
            "counter",
        )
        for state in State:
            recipients.add_sample(
                "mailpartner_recipients_total", {"state": state}, totals.recipients[state]
            )
        yield recipients
        cost = Metric("mailpartner_cost", "Cost observed over the exporter's life.", "counter")
        cost.add_sample("mailpartner_cost_total", {}, totals.cost)
        yield cost

        yield from self._api_metrics()
        yield from self._exporter_metrics(summary)

    def _api_metrics(self) -> Iterator[Metric]:
        stats = self._stats.snapshot()
        requests = Metric(
            "mailpartner_api_requests", "Requests sent to the Mail Partner API.", "counter"
        )
        for endpoint, count in sorted(stats.requests.items()):
            requests.add_sample("mailpartner_api_requests_total", {"endpoint": endpoint}, count)
        yield requests
        errors = Metric(
            "mailpartner_api_errors", "API error responses by upstream code.", "counter"
        )
        for (endpoint, code), count in sorted(stats.errors.items(), key=_code_order):
            errors.add_sample(
                "mailpartner_api_errors_total", {"endpoint": endpoint, "code": code}, count
            )
        yield errors
        failures = Metric(
            "mailpartner_api_request_failures",
            "Requests that got no usable answer, by reason.",
            "counter",
        )
        for (endpoint, reason), count in sorted(stats.failures.items()):
            failures.add_sample(
                "mailpartner_api_request_failures_total",
                {"endpoint": endpoint, "reason": reason},
                count,
            )
        yield failures
        duration = Metric(
            "mailpartner_api_request_duration_seconds",
            "Time from sending a request to the end of its response body.",
            "histogram",
        )
        for endpoint, histogram in sorted(stats.durations.items()):
            cumulative = 0
            for bound, count in zip(
                (*DURATION_BUCKETS, float("inf")), histogram.buckets, strict=True
            ):
                cumulative += count
                duration.add_sample(
                    "mailpartner_api_request_duration_seconds_bucket",
                    {"endpoint": endpoint, "le": _le(bound)},
                    cumulative,
                )
            duration.add_sample(
                "mailpartner_api_request_duration_seconds_count", {"endpoint": endpoint}, cumulative
            )
            duration.add_sample(
                "mailpartner_api_request_duration_seconds_sum",
                {"endpoint": endpoint},
                histogram.total,
            )
        yield duration
        yield _gauge(
            "mailpartner_up",
            "1 if the most recent API request succeeded (a message-"
            "level error such as code 4 still counts as the API answering).",
            1 if stats.up else 0,
        )

    def _exporter_metrics(self, summary: _Summary) -> Iterator[Metric]:
        config = self._holder.config
        load = self._holder.status
        now = self._clock()
        info = Metric("mailpartner_exporter_build_info", "Exporter version.", "gauge")
        info.add_sample("mailpartner_exporter_build_info", {"version": __version__}, 1)
        yield info
        phases = Metric("mailpartner_exporter_messages", "Tracked messages by phase.", "gauge")
        for phase in Phase:
            phases.add_sample(
                "mailpartner_exporter_messages", {"phase": phase}, summary.phases[phase]
            )
        yield phases
        yield _gauge(
            "mailpartner_exporter_config_last_reload_successful",
            "1 if the last configuration load succeeded.",
            1 if load.successful else 0,
        )
        yield _gauge(
            "mailpartner_exporter_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully.",
            load.last_success,
        )
        waiting = summary.waiting
        yield _gauge(
            "mailpartner_exporter_shards",
            "How many exporters share the messages (--shard.count).",
            config.shard_count,
        )
        yield _gauge(
            "mailpartner_exporter_shard_index",
            "Which share this exporter polls (--shard.index).",
            config.shard_index,
        )
        yield _gauge(
            "mailpartner_exporter_request_budget_per_minute",
            "Requests per minute this exporter allows itself (api.max_requests_per_minute).",
            config.api.max_requests_per_minute,
        )
        yield _gauge(
            "mailpartner_exporter_scheduled_requests_per_minute",
            "Requests per minute the poll schedule asks for right now; above the "
            "budget, polls fall behind.",
            summary.per_minute,
        )
        yield _gauge(
            "mailpartner_exporter_overdue_messages",
            f"Messages whose poll was due more than {OVERDUE_AFTER:g}s ago and has not started.",
            bisect.bisect_left(waiting, now - OVERDUE_AFTER),
        )
        yield _gauge(
            "mailpartner_exporter_poll_delay_seconds",
            "How far behind schedule the most overdue message is.",
            max(0.0, now - waiting[0]) if waiting else 0.0,
        )


class _Summary(NamedTuple):
    """What a scrape needs from all the messages at once; kept while they stay the same."""

    messages: tuple[TrackedMessage, ...]
    by_id: list[TrackedMessage]
    phases: Counter[Phase]
    per_minute: float  # polls the schedule asks for
    waiting: list[float]  # next polls of messages neither final nor in flight, sorted


def _summarize(messages: tuple[TrackedMessage, ...]) -> _Summary:
    live = [m for m in messages if m.phase != Phase.FINAL]
    return _Summary(
        messages,
        sorted(messages, key=_BY_ID),
        Counter(map(_PHASE, messages)),
        sum(60.0 / m.interval for m in live),
        sorted(m.next_poll for m in live if not m.in_flight),
    )


# Per tracked message, labelled message_id plus the message's own labels; all gauges.
MESSAGE_FAMILIES = (
    ("mailpartner_message_recipients", "Recipients per state."),
    (
        "mailpartner_message_recipients_by_status",
        "Recipients per raw upstream status, lower-cased.",
    ),
    ("mailpartner_message_cost", "Sum of cost over recipients."),
    ("mailpartner_message_unsubscribed_recipients", "Recipients with stopMail true."),
    (
        "mailpartner_message_last_report_timestamp_seconds",
        "Newest report date among the recipients.",
    ),
    (
        "mailpartner_message_sent_timestamp_seconds",
        "When the message was sent (sent_at, or first seen).",
    ),
    ("mailpartner_message_final", "1 once the message is final and no longer polled."),
    ("mailpartner_message_poll_success", "1 if the last poll of this message succeeded."),
    (
        "mailpartner_message_last_poll_success_timestamp_seconds",
        "When this message was last polled successfully.",
    ),
    (
        "mailpartner_message_next_poll_timestamp_seconds",
        "When the schedule polls this message next (absent once final).",
    ),
)


class MessageView(NamedTuple):
    """All a message's series depend on: equal views, equal series."""

    spec: MessageSpec
    aggregate: MessageAggregate | None
    sent_at: float
    final: bool
    poll_ok: bool
    last_success: float | None
    next_poll: float | None


def message_view(message: TrackedMessage) -> MessageView:
    return MessageView(
        message.spec,
        message.aggregate,
        message.sent_at,
        message.phase == Phase.FINAL,
        message.poll_ok,
        message.last_success,
        None if message.phase == Phase.FINAL else message.next_poll,
    )


def message_samples(view: MessageView) -> tuple[Samples, ...]:
    """(labels, value) of each of ``MESSAGE_FAMILIES``, in that order."""
    labels = {**view.spec.labels, "message_id": view.spec.id}
    aggregate = view.aggregate

    def one(value: float | None) -> Samples:
        return [] if value is None else [(labels, value)]

    return (
        [({**labels, "state": s}, aggregate.states[s] if aggregate else 0) for s in State],
        [({**labels, "status": s}, n) for s, n in aggregate.statuses.items()] if aggregate else [],
        one(aggregate.cost if aggregate else 0.0),
        one(aggregate.unsubscribed if aggregate else 0),
        one(aggregate.last_report if aggregate else None),
        one(view.sent_at),
        one(1 if view.final else 0),
        one(1 if view.poll_ok else 0),
        one(view.last_success),
        one(view.next_poll),
    )


def _gauge(name: str, documentation: str, value: float) -> Metric:
    metric = Metric(name, documentation, "gauge")
    metric.add_sample(name, {}, value)
    return metric


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _code_order(item: tuple[tuple[str, str], int]) -> tuple[str, int, str]:
    (endpoint, code), _ = item
    return (endpoint, int(code) if code.isdigit() else 1 << 30, code)
