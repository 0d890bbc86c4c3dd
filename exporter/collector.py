"""Every metric the exporter exposes is named here, built fresh on each scrape.

Sample exposition::

    mailpartner_message_recipients{campaign="newsletter",message_id="300",state="delivered"} 2.0
    mailpartner_recipients_total{campaign="newsletter",state="delivered"} 2.0
    mailpartner_delivery_delay_seconds_bucket{campaign="newsletter",le="60.0"} 2.0
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
from exporter.config.holder import ConfigHolder
from exporter.config.model import ApiConfig
from exporter.domain import MessageSpec, State
from exporter.exposition import MessageLines, PrerenderedFamily, Samples, gauge
from exporter.stats import DURATION_BUCKETS, RequestStats
from exporter.totals import TotalsSnapshot, label_sets
from exporter.tracked import SHOWN_PHASES, Phase, TrackedMessage, shown_phase, with_series
from exporter.tracker import MessageBook

# A poll this late is not just waiting for the loop's next turn: the budget or
# the concurrency cannot keep up with the schedule.
OVERDUE_AFTER = 5.0
_BY_ID = operator.attrgetter("spec.id")
_PHASE = operator.attrgetter("phase")


class MailPartnerCollector(Collector):
    """A bulk-status source's series: its messages', the totals, its API's and its budget's.

    SMS Partner's source uses the same with ``prefix="smspartner"``: every name below then
    starts with ``smspartner_``. ``stats`` None leaves the API's series to another collector
    (Mail Partner's are the process's: ``ProcessCollector``); ``api`` gives the budget.
    """

    def __init__(
        self,
        book: MessageBook,
        stats: RequestStats | None,
        api: Callable[[], ApiConfig],
        clock: Callable[[], float] = time.time,
        *,
        prefix: str = "mailpartner",
    ) -> None:
        self._book = book
        self._stats = stats
        self._api = api
        self._clock = clock
        self._p = prefix
        self._lines = MessageLines(message_families(prefix), message_view, message_samples)
        self._summary = _summarize(())
        self._aggregates: tuple[int, list[PrerenderedFamily]] = (-1, [])

    def collect(self) -> Iterator[Metric]:
        messages, totals = self._book.snapshot()
        limit = self._book.metrics.per_message_limit
        summary = self._summary
        # The same objects: a pointer check per message.
        if summary.messages != messages or summary.limit != limit:
            summary = self._summary = _summarize(messages, limit)
        # Built lazily: the fast path (exporter.exposition) reads their cached lines instead.
        yield from self._lines.metrics(summary.shown)
        if self._aggregates[0] != totals.version:  # rendered again only once they moved
            families = [PrerenderedFamily(m) for m in aggregate_metrics(totals, self._p)]
            self._aggregates = (totals.version, families)
        yield from self._aggregates[1]
        if self._stats is not None:
            yield from api_metrics(self._stats, self._p)
        yield from self._exporter_metrics(summary)

    def _exporter_metrics(self, summary: _Summary) -> Iterator[Metric]:
        now = self._clock()
        phases = Metric(f"{self._p}_exporter_messages", "Tracked messages by phase.", "gauge")
        for phase in SHOWN_PHASES:
            phases.add_sample(
                f"{self._p}_exporter_messages", {"phase": phase}, summary.phases[phase]
            )
        yield phases
        yield gauge(
            f"{self._p}_exporter_per_message_withheld",
            "Tracked messages whose per-message series metrics.per_message_limit withholds.",
            len(summary.messages) - len(summary.shown),
        )
        waiting = summary.waiting
        yield gauge(
            f"{self._p}_exporter_request_budget_per_minute",
            "Requests per minute this exporter allows itself (api.max_requests_per_minute).",
            self._api().max_requests_per_minute,
        )
        yield gauge(
            f"{self._p}_exporter_scheduled_requests_per_minute",
            "Requests per minute the poll schedule asks for right now; above the "
            "budget, polls fall behind.",
            summary.per_minute,
        )
        yield gauge(
            f"{self._p}_exporter_overdue_messages",
            f"Messages whose poll was due more than {OVERDUE_AFTER:g}s ago and has not started.",
            bisect.bisect_left(waiting, now - OVERDUE_AFTER),
        )
        yield gauge(
            f"{self._p}_exporter_poll_delay_seconds",
            "How far behind schedule the most overdue message is.",
            max(0.0, now - waiting[0]) if waiting else 0.0,
        )


class ProcessCollector(Collector):
    """Mail Partner's API series (shared by its sources) and the process's own.

    Sample exposition::

        mailpartner_api_requests_total{endpoint="me"} 3.0
        mailpartner_exporter_build_info{version="0.1.0"} 1.0
    """

    def __init__(self, stats: RequestStats, holder: ConfigHolder) -> None:
        self._stats = stats
        self._holder = holder

    def collect(self) -> Iterator[Metric]:
        yield from api_metrics(self._stats, "mailpartner")
        yield from _process_metrics(self._holder)


def api_metrics(request_stats: RequestStats, prefix: str) -> Iterator[Metric]:
    """Requests, errors, failures and durations per endpoint, and ``up``."""
    stats = request_stats.snapshot()
    api = _API_NAMES.get(prefix, prefix)
    requests = Metric(f"{prefix}_api_requests", f"Requests sent to the {api} API.", "counter")
    for endpoint, count in sorted(stats.requests.items()):
        requests.add_sample(f"{prefix}_api_requests_total", {"endpoint": endpoint}, count)
    yield requests
    errors = Metric(f"{prefix}_api_errors", "API error responses by upstream code.", "counter")
    for (endpoint, code), count in sorted(stats.errors.items(), key=_code_order):
        errors.add_sample(f"{prefix}_api_errors_total", {"endpoint": endpoint, "code": code}, count)
    yield errors
    failures = Metric(
        f"{prefix}_api_request_failures",
        "Requests that got no usable answer, by reason.",
        "counter",
    )
    for (endpoint, reason), count in sorted(stats.failures.items()):
        failures.add_sample(
            f"{prefix}_api_request_failures_total",
            {"endpoint": endpoint, "reason": reason},
            count,
        )
    yield failures
    duration = Metric(
        f"{prefix}_api_request_duration_seconds",
        "Time from sending a request to the end of its response body.",
        "histogram",
    )
    for endpoint, histogram in sorted(stats.durations.items()):
        cumulative = 0
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), histogram.buckets, strict=True):
            cumulative += count
            duration.add_sample(
                f"{prefix}_api_request_duration_seconds_bucket",
                {"endpoint": endpoint, "le": _le(bound)},
                cumulative,
            )
        duration.add_sample(
            f"{prefix}_api_request_duration_seconds_count", {"endpoint": endpoint}, cumulative
        )
        duration.add_sample(
            f"{prefix}_api_request_duration_seconds_sum",
            {"endpoint": endpoint},
            histogram.total,
        )
    yield duration
    yield gauge(
        f"{prefix}_up",
        "1 if the most recent API request succeeded (a message-"
        "level error such as code 4 still counts as the API answering).",
        1 if stats.up else 0,
    )


_API_NAMES = {"mailpartner": "Mail Partner", "smspartner": "SMS Partner"}


def _process_metrics(holder: ConfigHolder) -> Iterator[Metric]:
    config = holder.config
    load = holder.status
    info = Metric("mailpartner_exporter_build_info", "Exporter version.", "gauge")
    info.add_sample("mailpartner_exporter_build_info", {"version": __version__}, 1)
    yield info
    yield gauge(
        "mailpartner_exporter_config_last_reload_successful",
        "1 if the last configuration load succeeded.",
        1 if load.successful else 0,
    )
    yield gauge(
        "mailpartner_exporter_config_last_reload_success_timestamp_seconds",
        "When the configuration was last loaded successfully.",
        load.last_success,
    )
    yield gauge(
        "mailpartner_exporter_shards",
        "How many exporters share the messages (--shard.count).",
        config.shard_count,
    )
    yield gauge(
        "mailpartner_exporter_shard_index",
        "Which share this exporter polls (--shard.index).",
        config.shard_index,
    )


class _Summary(NamedTuple):
    """What a scrape needs from all the messages at once; kept while they stay the same."""

    messages: tuple[TrackedMessage, ...]
    limit: int
    shown: list[TrackedMessage]  # those with per-message series, by ID
    phases: Counter[str]
    per_minute: float  # polls the schedule asks for
    waiting: list[float]  # next polls of messages neither final nor in flight, sorted


def _summarize(messages: tuple[TrackedMessage, ...], limit: int = 0) -> _Summary:
    live = [m for m in messages if m.phase != Phase.FINAL]
    shown = with_series(messages, limit)
    phases = Counter(map(shown_phase, messages))
    # Held and deferred messages ask for nothing until they go out.
    waiting = [m for m in live if shown_phase(m) == "active" or m.phase == Phase.SETTLED]
    return _Summary(
        messages,
        limit,
        sorted(shown, key=_BY_ID),
        phases,
        sum(60.0 / m.interval for m in waiting),
        sorted(m.next_poll for m in live if not m.in_flight),
    )


def aggregate_metrics(totals: TotalsSnapshot, prefix: str) -> Iterator[Metric]:
    """The counters by ``metrics.aggregate_by`` label set, and the delivery-delay histogram."""
    recipients = Metric(
        f"{prefix}_recipients", "Recipients observed reaching each state.", "counter"
    )
    cost = Metric(f"{prefix}_cost", "Cost observed.", "counter")
    unsubscribed = Metric(
        f"{prefix}_unsubscribed_recipients",
        "Recipients observed on the unsubscribe list (stopMail true).",
        "counter",
    )
    messages = Metric(f"{prefix}_messages", "Messages tracked, counted when first seen.", "counter")
    delay = Metric(
        f"{prefix}_delivery_delay_seconds",
        "Delivered recipients by report date less the message's send time.",
        "histogram",
    )
    bounds = (*totals.buckets, float("inf"))
    for labels, tally in sorted(label_sets(totals), key=lambda item: sorted(item[0].items())):
        for state in State:
            recipients.add_sample(
                f"{prefix}_recipients_total", {**labels, "state": state}, tally.recipients[state]
            )
        cost.add_sample(f"{prefix}_cost_total", labels, tally.cost)
        unsubscribed.add_sample(
            f"{prefix}_unsubscribed_recipients_total", labels, tally.unsubscribed
        )
        messages.add_sample(f"{prefix}_messages_total", labels, tally.messages)
        cumulative = 0
        for bound, count in zip(bounds, tally.delays, strict=True):
            cumulative += count
            delay.add_sample(
                f"{prefix}_delivery_delay_seconds_bucket", {**labels, "le": _le(bound)}, cumulative
            )
        delay.add_sample(f"{prefix}_delivery_delay_seconds_count", labels, cumulative)
        delay.add_sample(f"{prefix}_delivery_delay_seconds_sum", labels, tally.delay_sum)
    yield from (recipients, cost, unsubscribed, messages, delay)
    overflow = Metric(
        f"{prefix}_exporter_aggregate_overflow",
        "Messages counted under the __other__ label set: max_aggregate_label_sets was reached.",
        "counter",
    )
    overflow.add_sample(f"{prefix}_exporter_aggregate_overflow_total", {}, totals.overflow)
    yield overflow


def message_families(prefix: str) -> tuple[tuple[str, str], ...]:
    """(name, help) of the per-message gauges, labelled message_id plus the message's labels."""
    flag = "stopSMS" if prefix == "smspartner" else "stopMail"
    return tuple(
        (f"{prefix}_{name}", help.replace("stopMail", flag)) for name, help in _MESSAGE_FAMILIES
    )


_MESSAGE_FAMILIES = (
    ("message_recipients", "Recipients per state."),
    (
        "message_recipients_by_status",
        "Recipients per raw upstream status, lower-cased.",
    ),
    ("message_cost", "Sum of cost over recipients."),
    (
        "message_unsubscribed_recipients",
        "Recipients with stopMail true.",
    ),
    (
        "message_last_report_timestamp_seconds",
        "Newest report date among the recipients.",
    ),
    (
        "message_sent_timestamp_seconds",
        "When the message was sent (sent_at, or first seen).",
    ),
    ("message_final", "1 once the message is final and no longer polled."),
    ("message_poll_success", "1 if the last poll of this message succeeded."),
    (
        "message_last_poll_success_timestamp_seconds",
        "When this message was last polled successfully.",
    ),
    (
        "message_next_poll_timestamp_seconds",
        "When the schedule polls this message next (absent once final).",
    ),
    (
        "message_first_report_timestamp_seconds",
        "When the first recipient's report came: the message's life counts from here (absent"
        " while nothing is reported, as when the platform holds it or it is deferred).",
    ),
)
MESSAGE_FAMILIES = message_families("mailpartner")


class MessageView(NamedTuple):
    """All a message's series depend on: equal views, equal series."""

    spec: MessageSpec
    aggregate: MessageAggregate | None
    sent_at: float | None
    final: bool
    poll_ok: bool
    last_success: float | None
    next_poll: float | None
    first_report: float | None = None


def message_view(message: TrackedMessage) -> MessageView:
    return MessageView(
        message.spec,
        message.aggregate,
        message.sent_at,
        message.phase == Phase.FINAL,
        message.poll_ok,
        message.last_success,
        None if message.phase == Phase.FINAL else message.next_poll,
        message.first_report,
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
        one(view.first_report),
    )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _code_order(item: tuple[tuple[str, str], int]) -> tuple[str, int, str]:
    (endpoint, code), _ = item
    return (endpoint, int(code) if code.isdigit() else 1 << 30, code)
