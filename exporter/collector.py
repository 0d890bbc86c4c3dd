"""Every metric the exporter exposes is named here, built fresh on each scrape.

Sample exposition::

    mailpartner_message_recipients{campaign="newsletter",message_id="300",state="delivered"} 2.0
    mailpartner_recipients_total{state="delivered"} 2.0
    mailpartner_api_errors_total{code="10",endpoint="bulk-status"} 0.0
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.config import State
from exporter.config.holder import ConfigHolder
from exporter.stats import DURATION_BUCKETS, RequestStats
from exporter.tracker import MessageBook, Phase, TrackedMessage

# A poll this late is not just waiting for the loop's next turn: the budget or
# the concurrency cannot keep up with the schedule.
OVERDUE_AFTER = 5.0


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

    def collect(self) -> Iterator[Metric]:
        messages, totals = self._book.snapshot()
        yield from _message_metrics(messages)

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
        yield from self._exporter_metrics(messages)

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

    def _exporter_metrics(self, messages: tuple[TrackedMessage, ...]) -> Iterator[Metric]:
        config = self._holder.config
        load = self._holder.status
        now = self._clock()
        info = Metric("mailpartner_exporter_build_info", "Exporter version.", "gauge")
        info.add_sample("mailpartner_exporter_build_info", {"version": __version__}, 1)
        yield info
        phases = Metric("mailpartner_exporter_messages", "Tracked messages by phase.", "gauge")
        for phase in Phase:
            phases.add_sample(
                "mailpartner_exporter_messages",
                {"phase": phase},
                sum(1 for m in messages if m.phase == phase),
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
        waiting = [m for m in messages if m.phase != Phase.FINAL and not m.in_flight]
        yield _gauge(
            "mailpartner_exporter_request_budget_per_minute",
            "Requests per minute this exporter allows itself (api.max_requests_per_minute).",
            config.api.max_requests_per_minute,
        )
        yield _gauge(
            "mailpartner_exporter_scheduled_requests_per_minute",
            "Requests per minute the poll schedule asks for right now; above the "
            "budget, polls fall behind.",
            sum(60.0 / m.interval for m in messages if m.phase != Phase.FINAL),
        )
        yield _gauge(
            "mailpartner_exporter_overdue_messages",
            f"Messages whose poll was due more than {OVERDUE_AFTER:g}s ago and has not started.",
            sum(1 for m in waiting if m.next_poll < now - OVERDUE_AFTER),
        )
        yield _gauge(
            "mailpartner_exporter_poll_delay_seconds",
            "How far behind schedule the most overdue message is.",
            max([0.0, *(now - m.next_poll for m in waiting)]),
        )


def _message_metrics(messages: tuple[TrackedMessage, ...]) -> Iterator[Metric]:
    families = {
        "recipients": Metric("mailpartner_message_recipients", "Recipients per state.", "gauge"),
        "by_status": Metric(
            "mailpartner_message_recipients_by_status",
            "Recipients per raw upstream status, lower-cased.",
            "gauge",
        ),
        "cost": Metric("mailpartner_message_cost", "Sum of cost over recipients.", "gauge"),
        "unsubscribed": Metric(
            "mailpartner_message_unsubscribed_recipients", "Recipients with stopMail true.", "gauge"
        ),
        "last_report": Metric(
            "mailpartner_message_last_report_timestamp_seconds",
            "Newest report date among the recipients.",
            "gauge",
        ),
        "sent": Metric(
            "mailpartner_message_sent_timestamp_seconds",
            "When the message was sent (sent_at, or first seen).",
            "gauge",
        ),
        "final": Metric(
            "mailpartner_message_final",
            "1 once the message is final and no longer polled.",
            "gauge",
        ),
        "poll_success": Metric(
            "mailpartner_message_poll_success",
            "1 if the last poll of this message succeeded.",
            "gauge",
        ),
        "last_success": Metric(
            "mailpartner_message_last_poll_success_timestamp_seconds",
            "When this message was last polled successfully.",
            "gauge",
        ),
    }
    for message in sorted(messages, key=lambda m: m.spec.id):
        labels = {**message.spec.labels, "message_id": message.spec.id}
        aggregate = message.aggregate
        for state in State:
            families["recipients"].add_sample(
                "mailpartner_message_recipients",
                {**labels, "state": state},
                aggregate.states[state] if aggregate else 0,
            )
        if aggregate is not None:
            for status, count in aggregate.statuses.items():
                families["by_status"].add_sample(
                    "mailpartner_message_recipients_by_status", {**labels, "status": status}, count
                )
            if aggregate.last_report is not None:
                _add(families["last_report"], labels, aggregate.last_report)
        _add(families["cost"], labels, aggregate.cost if aggregate else 0.0)
        _add(families["unsubscribed"], labels, aggregate.unsubscribed if aggregate else 0)
        _add(families["sent"], labels, message.sent_at)
        _add(families["final"], labels, 1 if message.phase == Phase.FINAL else 0)
        _add(families["poll_success"], labels, 1 if message.poll_ok else 0)
        if message.last_success is not None:
            _add(families["last_success"], labels, message.last_success)
    yield from families.values()


def _add(family: Metric, labels: Mapping[str, str], value: float) -> None:
    family.add_sample(family.name, dict(labels), value)


def _gauge(name: str, documentation: str, value: float) -> Metric:
    metric = Metric(name, documentation, "gauge")
    metric.add_sample(name, {}, value)
    return metric


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _code_order(item: tuple[tuple[str, str], int]) -> tuple[str, int, str]:
    (endpoint, code), _ = item
    return (endpoint, int(code) if code.isdigit() else 1 << 30, code)
