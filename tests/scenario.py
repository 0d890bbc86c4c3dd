"""A known set of messages, reports and requests, with time pinned: for exact expositions."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import requests
from prometheus_client.registry import CollectorRegistry

from exporter.aggregate import MessageAggregate, ReportAggregator
from exporter.client import BULK_STATUS
from exporter.collector import MailPartnerCollector, ProcessCollector
from exporter.config.holder import ConfigHolder
from exporter.config.model import Config, MetricsConfig
from exporter.domain import MessageSpec, StatusMap
from exporter.parse import parse_json
from exporter.poller import Poller
from exporter.stats import RequestStats
from exporter.tracker import MessageBook
from exporter.web import create_app, serve
from tests.conftest import START, FakeClock, bulk_status_poller, make_client, make_config

VECTORS = Path(__file__).parent / "vectors"


def report(body: bytes, sent_at: float | None = None) -> MessageAggregate:
    """``body`` parsed; with ``sent_at``, delivered recipients counted by delay too."""
    buckets = MetricsConfig().delivery_delay_buckets
    aggregator = ReportAggregator(StatusMap.default(), sent_at=sent_at, delay_buckets=buckets)
    parse_json(io.BytesIO(body), aggregator)
    return aggregator.result()


def scenario() -> tuple[CollectorRegistry, MessageBook, FakeClock]:
    """Message 300: the spec's example; 301: mixed statuses, then a failed poll; 302: new."""
    clock = FakeClock(START)
    config = make_config(
        "http://127.0.0.1:9/v1",
        MessageSpec("300", MappingProxyType({"campaign": "newsletter"}), sent_at=START - 600),
        MessageSpec("301", MappingProxyType({"campaign": "welcome", "team": "crm"})),
        MessageSpec("302"),
    )
    book = MessageBook(config.polling, jitter=lambda: 1.0)
    book.sync(config.messages, clock())
    stats = RequestStats([BULK_STATUS])

    book.start_poll("300", clock())
    # The spec's example is dated 2020: before the send, so counted at once, as skewed.
    spec_example = (VECTORS / "spec_success.json").read_bytes()
    book.record_success("300", report(spec_example, START - 600), clock())
    stats.request_started(BULK_STATUS)
    stats.request_finished(BULK_STATUS, 0.12, None, up=True)

    mixed = (
        b'{"success":true,"code":200,"StatutResponseList":['
        b'{"status":"Delivered","cost":0.0105,"stopMail":false,"date":"1795687300"},'
        b'{"status":"Waiting","cost":0.0105,"stopMail":false,"date":"1795687200"},'
        b'{"status":"ko","cost":0.0105,"stopMail":true,"date":"1795687310"},'
        b'{"status":"Soft Bounce","cost":0.0105,"stopMail":false,"date":"1795687320"}]}'
    )
    book.start_poll("301", clock())
    book.record_success("301", report(mixed, START), clock())
    stats.request_started(BULK_STATUS)
    stats.request_finished(BULK_STATUS, 0.3, None, up=True)

    clock.advance(30)
    book.start_poll("301", clock())
    book.record_failure("301", "http_502: HTTP 502", clock())
    stats.request_started(BULK_STATUS)
    stats.request_finished(BULK_STATUS, 7.0, "http_502", up=False)
    stats.request_started(BULK_STATUS)
    stats.request_finished(BULK_STATUS, 0.04, "10", up=False, api_error=True)

    registry = CollectorRegistry()
    # As the exporter registers them: the source's series, then the API's and the process's.
    registry.register(MailPartnerCollector(book, None, lambda: config.api, clock))
    registry.register(ProcessCollector(stats, ConfigHolder(config, START)))
    return registry, book, clock


def serve_scenario() -> Iterator[str]:
    """The scenario behind a real loopback socket; yields its base URL."""
    registry, book, clock = scenario()
    server = serve(create_app(registry, book, clock=clock), "127.0.0.1:0")
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@dataclass
class Running:
    """An exporter's pieces on a fake clock, with its HTTP side on a real socket."""

    config: Config
    book: MessageBook
    poller: Poller
    registry: CollectorRegistry
    url: str
    clock: FakeClock

    def step(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.poller.run_pending()

    def scrape(self) -> str:
        response = requests.get(f"{self.url}/metrics", timeout=5)
        assert response.status_code == 200
        return response.text

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@contextlib.contextmanager
def running(config: Config, clock: FakeClock) -> Iterator[Running]:
    stats = RequestStats([BULK_STATUS])
    source, poller = bulk_status_poller(config, make_client(config, stats), clock)
    book = source.book
    registry = CollectorRegistry()
    registry.register(source)
    registry.register(ProcessCollector(stats, ConfigHolder(config, clock())))
    server = serve(create_app(registry, book, clock=clock), "127.0.0.1:0")
    yield Running(config, book, poller, registry, f"http://127.0.0.1:{server.server_port}", clock)
    server.shutdown()
    server.server_close()
