"""The exact exposition for a known set of reports, with time pinned."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from exporter.domain import State
from tests.scenario import report, scenario

EXPECTED = Path(__file__).parent / "expected" / "exposition.txt"


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
