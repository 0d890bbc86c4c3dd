"""The exact exposition for a known set of reports, with time pinned."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from exporter.config.model import MetricsConfig
from exporter.domain import State
from exporter.landing import render_landing
from tests.conftest import START, make_config
from tests.scenario import report, scenario

EXPECTED = Path(__file__).parent / "expected" / "exposition.txt"


def test_exposition_is_exactly_as_expected() -> None:
    registry, _, _ = scenario()
    assert generate_latest(registry).decode() == EXPECTED.read_text()


def test_totals_keep_counting_after_messages_leave() -> None:
    registry, book, clock = scenario()
    delivered = {"campaign": "newsletter", "state": "delivered"}
    before = registry.get_sample_value("mailpartner_recipients_total", delivered)
    book.sync([], clock())
    assert (
        registry.get_sample_value(
            "mailpartner_message_recipients", {"message_id": "300", "state": "delivered"}
        )
        is None
    )
    assert registry.get_sample_value("mailpartner_recipients_total", delivered) == before == 2
    cost = [
        registry.get_sample_value("mailpartner_cost_total", {"campaign": c})
        for c in ("newsletter", "welcome", "")
    ]
    assert cost == [2.0, 0.042, 0.0]


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
        s: registry.get_sample_value(
            "mailpartner_recipients_total", {"campaign": "welcome", "state": s}
        )
        for s in State
    }
    # 301 (campaign welcome) went from 1 delivered / 1 pending to 2 delivered / 0 pending:
    # +1 delivered, and pending never goes down in a counter.
    assert total == {"delivered": 2, "failed": 1, "pending": 1, "unknown": 1}


def test_each_delivered_recipient_counts_once_in_the_delay_histogram() -> None:
    registry, book, clock = scenario()

    def bucket(le: str) -> float | None:
        labels = {"campaign": "welcome", "le": le}
        return registry.get_sample_value("mailpartner_delivery_delay_seconds_bucket", labels)

    # 301 was first seen at START: its one delivered report, 100 s later, is in le=120.
    assert (bucket("60.0"), bucket("120.0"), bucket("+Inf")) == (0, 1, 1)
    again = (
        b'{"success":true,"code":200,"StatutResponseList":['
        b'{"status":"Delivered","cost":0.0105,"stopMail":false,"date":"1795687300"},'
        b'{"status":"Delivered","cost":0.0105,"stopMail":false,"date":"1795690800"}]}'
    )
    for _ in range(2):  # the same delivered recipients, polled twice: counted once
        book.start_poll("301", clock())
        book.record_success("301", report(again, START), clock())
    # le is inclusive: a delay of exactly 3600 s is in le="3600.0".
    assert (bucket("120.0"), bucket("1800.0"), bucket("3600.0"), bucket("+Inf")) == (1, 1, 2, 2)
    total = registry.get_sample_value(
        "mailpartner_delivery_delay_seconds_sum", {"campaign": "welcome"}
    )
    assert total == 100 + 3600
    # The spec's example (message 300) is dated years before the send: the lowest bucket.
    newsletter = {"campaign": "newsletter", "le": "1.0"}
    assert registry.get_sample_value("mailpartner_delivery_delay_seconds_bucket", newsletter) == 2


def test_per_message_series_for_at_most_the_limit_unfinished_then_newest() -> None:
    registry, book, clock = scenario()
    config = make_config("http://127.0.0.1:9/v1")

    def with_series() -> set[str]:
        return {
            s.labels["message_id"]
            for m in registry.collect()
            if m.name == "mailpartner_message_final"
            for s in m.samples
        }

    def withheld() -> float | None:
        return registry.get_sample_value("mailpartner_exporter_per_message_withheld")

    assert (with_series(), withheld()) == ({"300", "301", "302"}, 0)
    # 300 was sent first (10 minutes before the others were first seen): withheld first.
    book.reconfigure(config.polling, MetricsConfig(per_message_limit=2))
    assert (with_series(), withheld()) == ({"301", "302"}, 1)
    # A final message gives way to any unfinished one, however old.
    for message_id in ("301", "302"):
        book.start_poll(message_id, clock())
        book.record_failure(message_id, "gone", clock() + 3 * 86400)
    book.reconfigure(config.polling, MetricsConfig(per_message_limit=1))
    assert (with_series(), withheld()) == ({"300"}, 2)
    # The aggregates still count every message.
    assert registry.get_sample_value("mailpartner_messages_total", {"campaign": ""}) == 1
    page = render_landing(book, "/metrics", clock)
    assert page.count("<tr data-message-id=") == 1 and "2 more, without per-message" in page
