"""The exact exposition for a known set of reports, with time pinned."""

from __future__ import annotations

import io
from pathlib import Path
from types import MappingProxyType

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from exporter.aggregate import ReportAggregator
from exporter.client import BULK_STATUS
from exporter.collector import MailPartnerCollector
from exporter.config import MessageSpec, State, StatusMap
from exporter.config.holder import ConfigHolder
from exporter.parse import parse_json
from exporter.stats import RequestStats
from exporter.tracker import MessageBook
from tests.conftest import START, FakeClock, make_config

VECTORS = Path(__file__).parent / "vectors"
EXPECTED = Path(__file__).parent / "expected" / "exposition.txt"


def report(body: bytes):  # type: ignore[no-untyped-def]
    aggregator = ReportAggregator(StatusMap.default())
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
    book = MessageBook(config.polling)
    book.sync(config.messages, clock())
    stats = RequestStats([BULK_STATUS])

    book.start_poll("300", clock())
    book.record_success("300", report((VECTORS / "spec_success.json").read_bytes()), clock())
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
    book.record_success("301", report(mixed), clock())
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
    registry.register(MailPartnerCollector(book, stats, ConfigHolder(config, START), clock))
    return registry, book, clock


def test_exposition_is_exactly_as_expected() -> None:
    registry, _, _ = scenario()
    assert generate_latest(registry).decode() == EXPECTED.read_text()


def test_totals_keep_counting_after_messages_leave() -> None:
    registry, book, clock = scenario()
    before = registry.get_sample_value("mailpartner_recipients_total", {"state": "delivered"})
    book.sync([], clock())
    assert (
        registry.get_sample_value(
            "mailpartner_message_recipients", {"message_id": "300", "state": "delivered"}
        )
        is None
    )
    assert (
        registry.get_sample_value("mailpartner_recipients_total", {"state": "delivered"})
        == before
        == 3
    )
    assert registry.get_sample_value("mailpartner_cost_total") == 2.042


def test_totals_grow_by_the_positive_change_of_each_message() -> None:
    registry, book, clock = scenario()
    later = (
        b'{"success":true,"code":200,"StatutResponseList":['
        b'{"status":"Delivered","cost":0.0105},{"status":"Delivered","cost":0.0105},'
        b'{"status":"ko","cost":0.0105},{"status":"Soft Bounce","cost":0.0105}]}'
    )
    book.start_poll("301", clock())
    book.record_success("301", report(later), clock())
    total = {
        s: registry.get_sample_value("mailpartner_recipients_total", {"state": s}) for s in State
    }
    # 301 went from 1 delivered / 1 pending to 2 delivered / 0 pending: +1 delivered,
    # and pending never goes down in a counter.
    assert total == {"delivered": 4, "failed": 1, "pending": 1, "unknown": 1}
