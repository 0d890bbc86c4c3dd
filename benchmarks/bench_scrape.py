"""Cheap scrapes: ``/metrics`` over 10,000 tracked messages, and the poller's CPU per poll.

The state is built through the real MessageBook (two labels and 5-10 statuses per message)
and served by the real HTTP server on loopback. Latency is the time to the last byte of the
body as sent (gzip not decoded: Prometheus does that while parsing), over a ``requests``
session (wsgiref answers in HTTP/1.0, so each scrape also pays a loopback connect), against
``generate_latest(registry)`` timed in the same run. The collector's clock is frozen so both
renderers describe the same instant, byte for byte, and the first scrape checks they do.

Also printed, without targets: the first scrape (cold caches), scrapes after ``CHURN``
messages were polled again, and polls per CPU-second of the real Poller and MessageBook
with an in-process client (no HTTP, no parsing).

    python benchmarks/bench_scrape.py [--messages N] [--scrapes N]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import random
import statistics
import sys
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import requests
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from benchmarks.common import Result, inline_source, print_results
from exporter.aggregate import MessageAggregate, ReportAggregator
from exporter.client import BULK_STATUS
from exporter.collector import MailPartnerCollector, ProcessCollector
from exporter.config.holder import ConfigHolder
from exporter.config.model import ApiConfig, Config, MetricsConfig, PollingConfig, ScheduleStep
from exporter.domain import MessageSpec, State, StatusMap
from exporter.stats import RequestStats
from exporter.tracker import MessageBook
from exporter.web import create_app, serve

MESSAGES = 10_000
TARGET_MS = 25.0
TARGET_SPEEDUP = 10.0
CHURN = 150  # messages changed between scrapes: 600 polls/min at a 15 s scrape interval
STATUSES = ["delivered", "not delivered", "ko", "bounced", "rejected", "waiting", "queued"]
STATUSES += ["soft bounce", "hard bounce", "spam", "blocked", "deferred"]
STATUS_MAP = StatusMap.default()
NOW = 1795687200.0


def seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - benchmark data, not secrets


def specs(count: int) -> list[MessageSpec]:
    return [
        MessageSpec(
            str(4_000_000 + i),
            MappingProxyType({"campaign": f"newsletter-{i % 40:02d}", "team": f"team-{i % 7}"}),
            sent_at=NOW - 60 * (i % 2800),  # sent over the last 47 hours
        )
        for i in range(count)
    ]


def aggregate(rng: random.Random, pending: bool = False) -> MessageAggregate:
    """A realistic report: 5-10 statuses, thousands of recipients, one report date."""
    chosen = rng.sample(STATUSES, rng.randint(5, 10))
    if pending and "waiting" not in chosen:
        chosen[0] = "waiting"
    statuses = {status: rng.randint(1, 5000) for status in sorted(chosen)}
    states = dict.fromkeys(State, 0)
    for status, count in statuses.items():
        states[STATUS_MAP.state_of(status)] += count
    return MessageAggregate(
        MappingProxyType(states),
        MappingProxyType(statuses),
        cost=round(sum(statuses.values()) * 0.0105, 4),
        unsubscribed=rng.randint(0, 40),
        last_report=NOW - rng.randint(0, 3600),
    )


def build_book(count: int = MESSAGES, seed: int = 1) -> tuple[MessageBook, Config]:
    """``count`` messages, each polled once through ``record_success``."""
    rng = seeded(seed)
    # Every message with its per-message series: the scrape this benchmark is about.
    metrics = MetricsConfig(per_message_limit=count)
    config = Config(file="bench", messages=tuple(specs(count)), metrics=metrics)
    book = MessageBook(config.polling, jitter=lambda: 1.0, metrics=metrics)
    book.sync(config.messages, NOW)
    for spec in config.messages:
        book.start_poll(spec.id, NOW)
        book.record_success(spec.id, aggregate(rng), NOW)
    return book, config


def registry_for(book: MessageBook, config: Config) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)  # as exporter.app builds it
    stats = RequestStats([BULK_STATUS])
    registry.register(MailPartnerCollector(book, None, lambda: config.api, lambda: NOW))
    registry.register(ProcessCollector(stats, ConfigHolder(config, NOW)))
    return registry


def timed(action: Callable[[], Any], times: int) -> list[float]:
    """Milliseconds per call."""
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        action()
        spent.append((time.perf_counter() - start) * 1000)
    return spent


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def scrape(session: requests.Session, url: str, packed: bool) -> bytes:
    """One scrape, read to its last byte as sent."""
    encoding = {"Accept-Encoding": "gzip" if packed else "identity"}
    with session.get(url, headers=encoding, stream=True, timeout=60) as response:
        response.raise_for_status()
        body: bytes = response.raw.read(decode_content=False)
        return body


def churn(rng: random.Random, book: MessageBook) -> None:
    """``CHURN`` messages polled again with new reports, as between two real scrapes."""
    messages, _ = book.snapshot()
    for message in rng.sample(messages, min(CHURN, len(messages))):
        book.start_poll(message.spec.id, NOW)
        book.record_success(message.spec.id, aggregate(rng), NOW)


class PreparedClient:
    """Answers bulk-status in process with a prepared aggregate: no HTTP, no parsing."""

    stats = RequestStats([BULK_STATUS])  # what the poller reads of a client

    def __init__(self, aggregates: dict[str, MessageAggregate]) -> None:
        self._aggregates = aggregates
        self.polls = 0

    def bulk_status(
        self, message_id: str, aggregator: ReportAggregator, *_: object
    ) -> MessageAggregate:
        self.polls += 1
        return self._aggregates[message_id]


def polls_per_cpu_second(count: int, rounds: int = 5) -> float:
    """The real Poller and MessageBook polling ``count`` messages ``rounds`` times."""
    rng = seeded(3)
    polling = PollingConfig(schedule=(ScheduleStep(until=48 * 3600.0, every=60.0),))
    api = ApiConfig(max_requests_per_minute=10**9, concurrency=count)
    config = Config(file="bench", api=api, polling=polling, messages=tuple(specs(count)))
    client = PreparedClient({s.id: aggregate(rng, pending=True) for s in config.messages})
    clock = [NOW]
    _, poller = inline_source(config, client, lambda: clock[0])
    start = time.process_time()
    for _ in range(rounds):
        poller.run_pending()
        clock[0] += 60.0
    return client.polls / (time.process_time() - start)


def measure(url: str, book: MessageBook, expected: bytes, scrapes: int) -> dict[str, list[float]]:
    """Scrape times in ms: the first (cold), plain and gzip, then each after ``CHURN`` changes."""
    rng = seeded(4)
    times: dict[str, list[float]] = {}
    with requests.Session() as session:
        # The first scrape fills the caches; both must be exactly what generate_latest says.
        start = time.perf_counter()
        if scrape(session, url, False) != expected:
            raise AssertionError("plain /metrics differs from generate_latest(registry)")
        times["cold"] = [(time.perf_counter() - start) * 1000]
        if gzip.decompress(scrape(session, url, True)) != expected:
            raise AssertionError("gzip /metrics differs from generate_latest(registry)")
        for packed, name in ((False, "plain"), (True, "gzip")):
            times[name] = timed(functools.partial(scrape, session, url, packed), scrapes)
        for packed, name in ((False, "plain churn"), (True, "gzip churn")):
            times[name] = []
            for _ in range(max(5, scrapes // 5)):
                churn(rng, book)
                times[name] += timed(functools.partial(scrape, session, url, packed), 1)
    return times


def run(messages: int = MESSAGES, scrapes: int = 50) -> list[Result]:
    book, config = build_book(messages)
    registry = registry_for(book, config)
    baseline = statistics.median(timed(lambda: generate_latest(registry), 5))
    server = serve(create_app(registry, book), "127.0.0.1:0")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        times = measure(url, book, generate_latest(registry), scrapes)
    finally:
        server.shutdown()
        server.server_close()
    results = []
    for name in ("plain", "gzip"):
        p50, p95 = percentile(times[name], 0.5), percentile(times[name], 0.95)
        speedup = baseline / p50
        note = f"<= {TARGET_MS:g} ms; p95 {p95:.1f} ms; generate_latest p50 {baseline:.0f} ms"
        churned = statistics.median(times[f"{name} churn"])
        results += [
            Result(f"/metrics {name} p50", p50, "ms", TARGET_MS, p50 <= TARGET_MS, note),
            Result(
                f"/metrics {name} vs generate_latest",
                speedup,
                "x faster",
                TARGET_SPEEDUP,
                speedup >= TARGET_SPEEDUP,
                f">= {TARGET_SPEEDUP:g}x: p50 {baseline:.0f} ms / {p50:.1f} ms",
            ),
            Result(
                f"/metrics {name} p50, {CHURN} changed",
                churned,
                "ms",
                0,
                True,
                f"no target: {CHURN} of {messages:,} messages re-polled before each scrape",
            ),
        ]
    cold = times["cold"][0]
    results.append(Result("first /metrics (cold)", cold, "ms", 0, True, "no target"))
    polls = polls_per_cpu_second(messages)
    note = "no target: real Poller + MessageBook, in-process client (no HTTP, no parsing)"
    return [*results, Result("polls per CPU-second", polls, "polls/s", 0, True, note)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args()
    results = run(args.messages, args.scrapes)
    print_results(f"Cheap scrapes ({args.messages:,} messages)", results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
