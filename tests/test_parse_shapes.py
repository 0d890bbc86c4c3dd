"""Report shapes: SMS Partner's bulk-status documents read by the same parsers as Mail
Partner's.

SMS Partner (``GET https://api.smspartner.fr/v1/bulk-status``) writes the report list as
``StatutResponse_List``, the unsubscribe flag as ``stopSMS`` and a phone number for the
recipient; ``tests/vectors/smspartner-bulk-status.json`` is its documented example, which
has no cost. The simulator writes a cost where Mail Partner's is, between status and flag.
Its XML, like Mail Partner's, is the keyless ``<result><entry>`` form.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from exporter.aggregate import MessageAggregate, ReportAggregator
from exporter.domain import State, StatusMap
from exporter.parse import (
    MAIL,
    SMS,
    Body,
    InvalidResponse,
    ReportShape,
    UpstreamError,
    parse_json,
    parse_json_exact,
    parse_xml,
)
from exporter.simulator.formats import render_json, render_xml

VECTORS = Path(__file__).parent / "vectors"
SMS_EXAMPLE = "smspartner-bulk-status.json"
Parser = Callable[[Body, ReportAggregator, ReportShape], None]
# parse_json counts plain reports on its fast path; parse_json_exact is the walker alone.
JSON_PARSERS: dict[str, Parser] = {"fast": parse_json, "exact": parse_json_exact}
COMPACT: dict[str, Any] = {"separators": (",", ":")}
LAYOUTS: dict[str, dict[str, Any]] = {"compact": COMPACT, "spaced": {}, "pretty": {"indent": 2}}
PLACEHOLDERS = {"email": "a@example.com", "token": "t0", "phoneNumber": "+33600000000"}
ABSENT = object()  # a key left out of the report


class BulkCounting(ReportAggregator):
    """Also counts the reports added in bulk: the fast path's, never the walker's."""

    def __init__(self) -> None:
        super().__init__(StatusMap.default())
        self.in_bulk = 0

    def add_many(
        self,
        statuses: Mapping[str, int],
        costs: Iterable[float],
        unsubscribed: int,
        last: float | None,
    ) -> None:
        self.in_bulk += sum(statuses.values())
        super().add_many(statuses, costs, unsubscribed, last)


def parsed(
    raw: bytes, shape: ReportShape, parse: Parser = parse_json
) -> tuple[MessageAggregate, int]:
    """The aggregate, and how many of its reports the fast path counted."""
    aggregator = BulkCounting()
    parse(io.BytesIO(raw), aggregator, shape)
    return aggregator.result(), aggregator.in_bulk


def outcome(raw: bytes, shape: ReportShape, parse: Parser) -> MessageAggregate | str:
    """The aggregate, or the refusal, down to its message."""
    try:
        return parsed(raw, shape, parse)[0]
    except (InvalidResponse, UpstreamError) as e:
        return f"{type(e).__name__}: {e}"


def report(shape: ReportShape, **values: object) -> dict[str, object]:
    """A report in ``shape``'s documented key order: placeholders, then ``values`` (whose
    ``stop`` is the shape's flag); a value ABSENT leaves its key out."""
    values = {shape.stop_key if k == "stop" else k: v for k, v in values.items()}
    known = {key: values.pop(key, PLACEHOLDERS.get(key)) for key in shape.report_keys}
    return {k: v for k, v in {**known, **values}.items() if v is not ABSENT}


def document(shape: ReportShape, reports: list[dict[str, object]], **layout: Any) -> bytes:
    envelope = {"success": True, "code": 200, "message_id": "111", shape.list_key: reports}
    return json.dumps(envelope, **layout).encode()


def xml_document(entries: Iterable[Iterable[str]]) -> bytes:
    recipients = "".join(
        "<entry>" + "".join(f"<entry><![CDATA[{v}]]></entry>" for v in values) + "</entry>"
        for values in entries
    )
    return (
        "<?xml version='1.0' encoding='UTF-8'?><result><entry>true</entry><entry>200</entry>"
        f"<entry><![CDATA[111]]></entry><entry>{recipients}</entry></result>"
    ).encode()


def states(
    delivered: int = 0, failed: int = 0, pending: int = 0, unknown: int = 0
) -> dict[State, int]:
    return {
        State.DELIVERED: delivered,
        State.FAILED: failed,
        State.PENDING: pending,
        State.UNKNOWN: unknown,
    }


# ---------------------------------------------------------------- the documented example


@pytest.mark.parametrize("parser", sorted(JSON_PARSERS))
def test_sms_partner_documented_example(parser: str) -> None:
    raw = (VECTORS / SMS_EXAMPLE).read_bytes()
    result, _ = parsed(raw, SMS, JSON_PARSERS[parser])
    assert dict(result.states) == states(delivered=2)
    assert dict(result.statuses) == {"delivered": 2}
    assert (result.cost, result.unsubscribed, result.last_report) == (0.0, 0, 1517989111.0)


@pytest.mark.parametrize("cost", [ABSENT, 0.045], ids=["documented", "with cost"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plain_sms_reports_are_counted_in_bulk_as_the_walker_counts_them(
    layout: str, cost: object
) -> None:
    statuses = ["delivered", "not delivered", "waiting", "ko", "Delivered"]
    reports = [
        report(
            SMS,
            phoneNumber=f"+336{i:08d}",
            status=statuses[i % 5],
            cost=cost,
            stop=[False, True, None][i % 3],
            date=str(1517989000 + i % 997),
        )
        for i in range(3000)  # well past one 64 KiB chunk
    ]
    raw = document(SMS, reports, **LAYOUTS[layout])
    fast, in_bulk = parsed(raw, SMS)
    assert in_bulk == 3000
    assert fast == parsed(raw, SMS, parse_json_exact)[0]
    assert dict(fast.states) == states(delivered=1200, failed=1200, pending=600)
    assert fast.statuses == {"delivered": 1200, "not delivered": 600, "waiting": 600, "ko": 600}
    total = 0.0 if cost is ABSENT else sum([0.045] * 3000)
    assert (fast.cost, fast.unsubscribed, fast.last_report) == (total, 1000, 1517989996.0)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (1, "API key is required"),
        (3, "Message ID is required"),
        (4, "Message not found"),
        (10, "Invalid API key"),
    ],
)
def test_sms_partner_error_codes(code: int, message: str) -> None:
    raw = json.dumps({"success": False, "code": code, "message": message}).encode()
    for parse in JSON_PARSERS.values():
        with pytest.raises(UpstreamError) as caught:
            parsed(raw, SMS, parse)
        assert (caught.value.code, caught.value.message) == (str(code), message)


# ---------------------------------------------------------------- one shape is not the other


@pytest.mark.parametrize(
    ("vector", "shape"), [("spec_success.json", SMS), (SMS_EXAMPLE, MAIL)], ids=["mail", "sms"]
)
@pytest.mark.parametrize("layout", ["as documented", "compact"])
@pytest.mark.parametrize("parser", sorted(JSON_PARSERS))
def test_a_body_of_the_other_shape_has_no_report_list(
    vector: str, shape: ReportShape, layout: str, parser: str
) -> None:
    raw = (VECTORS / vector).read_bytes()
    if layout == "compact":
        raw = json.dumps(json.loads(raw), **COMPACT).encode()
    parse = JSON_PARSERS[parser]
    without_list = b'{"success": true, "code": 200, "messageId": "111"}'
    with pytest.raises(InvalidResponse) as missing:
        parsed(without_list, shape, parse)
    with pytest.raises(InvalidResponse) as caught:
        parsed(raw, shape, parse)
    assert str(caught.value) == str(missing.value) == f"success without a {shape.list_key}"


@pytest.mark.parametrize(
    ("shape", "other_flag"), [(SMS, "stopMail"), (MAIL, "stopSMS")], ids=["sms", "mail"]
)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("parser", sorted(JSON_PARSERS))
def test_only_the_shapes_own_unsubscribe_flag_counts(
    shape: ReportShape, other_flag: str, layout: str, parser: str
) -> None:
    own = report(shape, status="delivered", stop=True)  # plain: the fast path counts these
    in_its_place = {other_flag if k == shape.stop_key else k: v for k, v in own.items()}
    reports = [own] * 50 + [in_its_place] * 50
    reports += [report(shape, stop=False, **{other_flag: True})] * 50
    reports += [report(shape, stop=ABSENT, **{other_flag: "1"})] * 50
    result, _ = parsed(document(shape, reports, **LAYOUTS[layout]), shape, JSON_PARSERS[parser])
    assert (result.recipients, result.unsubscribed) == (200, 50)


# ---------------------------------------------------------------- fast path = walker

SMS_STATUSES = ["delivered", "not delivered", "waiting", "ko", "Delivered", " KO ", None]
# Values the fast path takes, then others the walker alone reads.
SMS_VALUES: dict[str, tuple[list[object], list[object]]] = {
    "stop": ([True, False, None], ["1", "true", 1, 0, "0", ABSENT]),
    "cost": ([ABSENT, 0.045, None], ["0.045", 1e-3, 0, 1e20, 2**70]),
    "date": (["1517989111", "1517989101", "", None], [1517989101, "x", "01517989111"]),
}


@st.composite
def sms_bodies(draw: st.DrawFn) -> bytes:
    """SMS Partner bodies: a few drawn values for each field (half of the time only plain
    ones), dealt out to up to 1,500 reports by a seeded ``Random`` (much faster than
    drawing each), compact, spaced or pretty-printed, and sometimes cut short."""
    plain = draw(st.booleans())
    pools = {
        field: draw(
            st.lists(st.sampled_from(usual if plain else usual + odd), min_size=1, max_size=3)
        )
        for field, (usual, odd) in SMS_VALUES.items()
    }
    statuses = draw(st.lists(st.sampled_from(SMS_STATUSES), min_size=1, max_size=4))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    reports = [
        report(
            SMS,
            phoneNumber=f"+336{i:08d}",
            status=rnd.choice(statuses),
            **{field: rnd.choice(pool) for field, pool in pools.items()},
        )
        for i in range(draw(st.sampled_from([0, 1, 2, 7, 60, 1500])))
    ]
    raw = document(SMS, reports, **LAYOUTS[draw(st.sampled_from(sorted(LAYOUTS)))])
    if draw(st.integers(0, 3)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


@settings(
    max_examples=100,  # about half a second on two cores
    derandomize=True,  # the same bodies on every run: a failure seen once is seen again
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(raw=sms_bodies())
def test_the_fast_path_and_the_walker_agree_on_sms_bodies(raw: bytes) -> None:
    fast = outcome(raw, SMS, parse_json)
    event("refused" if isinstance(fast, str) else "parsed")
    assert fast == outcome(raw, SMS, parse_json_exact)


# ---------------------------------------------------------------- XML


def test_sms_partner_xml_gives_what_its_json_gives() -> None:
    as_json = json.loads((VECTORS / SMS_EXAMPLE).read_bytes())
    entries = [
        [str(v).lower() if isinstance(v, bool) else str(v) for v in r.values()]
        for r in as_json[SMS.list_key]
    ]
    from_xml, _ = parsed(xml_document(entries), SMS, parse_xml)
    assert from_xml == parsed((VECTORS / SMS_EXAMPLE).read_bytes(), SMS)[0]


def test_sms_partner_xml_reads_values_by_their_sms_positions() -> None:
    raw = xml_document(
        [
            ["+33600000001", "delivered", "true", "1517989111"],
            ["+33600000002", "not delivered", "0.045", "false", "1517989222"],  # with a cost
            ["+33600000003", "waiting", "1", ""],
        ]
    )
    result, _ = parsed(raw, SMS, parse_xml)
    assert dict(result.states) == states(delivered=1, failed=1, pending=1)
    assert (result.cost, result.unsubscribed, result.last_report) == (0.045, 2, 1517989222.0)


def test_sms_bodies_as_the_simulator_writes_them() -> None:
    statuses = ["delivered", "waiting", "not delivered", "ko"]
    reports = [
        {
            "phoneNumber": f"+336{i:08d}",
            "status": statuses[i % 4],
            "cost": 0.045,
            "stopSMS": i % 10 == 0,
            "date": str(1795687200 + i),
        }
        for i in range(2000)
    ]
    payload = {"success": True, "code": 200, "message_id": "7", SMS.list_key: reports}
    from_json, in_bulk = parsed(render_json(payload), SMS)
    assert in_bulk == 2000
    assert from_json == parsed(render_json(payload), SMS, parse_json_exact)[0]
    assert from_json == parsed(render_xml(payload), SMS, parse_xml)[0]
    assert dict(from_json.states) == states(delivered=500, failed=1000, pending=500)
    assert (from_json.unsubscribed, from_json.last_report) == (200, 1795689199.0)
    assert from_json.cost == sum([0.045] * 2000)


@pytest.mark.parametrize(
    ("values", "shape", "problem"),
    [
        (["a@x", "t", "Delivered", "1", "true", "1"], SMS, "does not hold four or five values"),
        (["+33600000001", "delivered", "true"], SMS, "does not hold four or five values"),
        (["+33600000001", "delivered", "true", "1517989111"], MAIL, "does not hold six values"),
    ],
    ids=["mail-entry-as-sms", "three-values-as-sms", "sms-entry-as-mail"],
)
def test_an_xml_entry_of_the_other_shape_is_refused(
    values: list[str], shape: ReportShape, problem: str
) -> None:
    with pytest.raises(InvalidResponse, match=problem):
        parsed(xml_document([values]), shape, parse_xml)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("list_key", "stop_key", "keys"),
    [
        ("List", "stop", ("status", "date")),  # no flag
        ("List", "stop", ("status", "stop", "stop", "date")),  # a key twice
        ("List", "status", ("id", "status", "date")),  # the flag is the status
        ("List", "stop", ("cost", "status", "stop", "date")),  # cost first
        ("List", "stop", ("status", "stop", "date", "cost")),  # cost last
        ('Li"st', "stop", ("status", "stop", "date")),  # a quote in a key
    ],
)
def test_unusable_shapes_are_refused(list_key: str, stop_key: str, keys: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        ReportShape(list_key, stop_key, keys)


def test_an_optional_cost_needs_its_place() -> None:
    with pytest.raises(ValueError, match="optional cost"):
        ReportShape("List", "stop", ("status", "stop", "date"), cost_optional=True)
    assert SMS.layouts == (
        ("phoneNumber", "status", "cost", "stopSMS", "date"),
        ("phoneNumber", "status", "stopSMS", "date"),
    )
    assert MAIL.layouts == (MAIL.report_keys,)


@pytest.mark.parametrize("shape", [MAIL, SMS], ids=["mail", "sms"])
def test_delays_are_the_same_from_the_fast_path_the_walker_and_xml(shape: ReportShape) -> None:
    """Each delivered recipient counted by its delay from the send, whichever parser reads it:
    the fast path counts dates in bulk, the walker and XML one report at a time."""
    sent_at = 1795687200.0
    buckets = (1.0, 60.0, 3600.0)
    statuses = ["Delivered", "Waiting", "Not delivered", "delivered", "DELIVERED"]
    # Some before the send (skewed), some within a second, a minute, an hour, past it; some
    # without a date.
    offsets = [-30, 0, 1, 2, 59, 60, 61, 3599, 3600, 9000, None]
    reports = []
    for i in range(1100):
        offset = offsets[i % len(offsets)]
        report: dict[str, object] = {key: f"v{i}" for key in shape.report_keys}
        report.update(
            status=statuses[i % len(statuses)],
            cost=0.0105,
            date="" if offset is None else str(int(sent_at) + offset),
        )
        report[shape.stop_key] = i % 7 == 0
        reports.append(report)
    payload = {"success": True, "code": 200, "messageId": "7", shape.list_key: reports}

    def delays(raw: bytes, parse: Parser) -> tuple[tuple[int, ...], float, int]:
        aggregator = ReportAggregator(StatusMap.default(), sent_at=sent_at, delay_buckets=buckets)
        parse(io.BytesIO(raw), aggregator, shape)
        result = aggregator.result()
        return result.delays, result.delay_sum, result.skewed

    fast = delays(render_json(payload), parse_json)
    assert fast == delays(render_json(payload), parse_json_exact)
    assert fast == delays(render_xml(payload), parse_xml)
    counted, _, skewed = fast
    delivered = sum(1 for r in reports if str(r["status"]).lower() == "delivered" and r["date"])
    assert sum(counted) == delivered and skewed > 0


def test_a_report_dated_within_the_sends_own_second_is_not_skew() -> None:
    """Report dates are whole seconds; a send at 12:00:00.7 delivered at once reads 12:00:00.
    That is a delay of 0, not a clock skew worth a warning; a second earlier is skew."""
    sent_at = 1795687200.7
    aggregator = ReportAggregator(StatusMap.default(), sent_at=sent_at, delay_buckets=(1.0,))
    aggregator.add_delivered({1795687200.0: 3})
    assert aggregator.result().skewed == 0
    assert aggregator.result().delays == (3, 0)
    aggregator.add_delivered({1795687199.0: 2})
    assert aggregator.result().skewed == 2
