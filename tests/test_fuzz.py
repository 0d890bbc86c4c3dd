"""Property tests for the parsers: whatever the body, only ``InvalidResponse`` or
``UpstreamError`` comes out, and well-formed reports add up as a plain reference says.

Lone surrogates, blank statuses, non-ASCII digits and XML encoding declarations have their
own cases in tests/corpus/ rather than in these strategies.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from exporter.aggregate import MAX_STATUSES, OTHER_STATUS, MessageAggregate, ReportAggregator
from exporter.domain import State, StatusMap
from exporter.parse import (
    MAX_STATUS_LENGTH,
    Body,
    InvalidResponse,
    UpstreamError,
    parse_json,
    parse_xml,
)

# The same examples on every run, so a failure seen once is seen again. A hundred of the
# structured ones, about 5 ms each, keeps every test near half a second on two cores; the
# cheap ones run three hundred.
FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow],
)
PARSERS: dict[str, Callable[[Body, ReportAggregator], None]] = {
    "json": parse_json,
    "xml": parse_xml,
}
LIST = "StatutResponseList"
MISSING = "none"  # the documented status of a report without one
FIELDS = ("email", "token", "status", "cost", "stopMail", "date")
KNOWN_STATUSES = (
    "Delivered",
    "Not delivered",
    "KO",
    "Bounced",
    "Failed",
    "Rejected",
    "Waiting",
    "Pending",
    "Queued",
    "Soft bounce",
    "Opened",
    "Spam",
    "other",
    "OTHER",
)


def parse(fmt: str, raw: bytes) -> MessageAggregate | None:
    """The aggregate, or None when the body is refused in one of the two allowed ways.

    Any other exception propagates and fails the property.
    """
    aggregator = ReportAggregator(StatusMap.default())
    try:
        PARSERS[fmt](io.BytesIO(raw), aggregator)
    except (InvalidResponse, UpstreamError):
        return None
    return aggregator.result()


def assert_consistent(result: MessageAggregate, recipients: int) -> None:
    assert set(result.states) == set(State)
    assert result.recipients == recipients
    assert sum(result.statuses.values()) == recipients
    assert len(result.statuses) <= MAX_STATUSES
    assert 0 <= result.unsubscribed <= recipients
    assert math.isfinite(result.cost)


# ---------------------------------------------------------------- (a) arbitrary bytes

PREFIXES = (
    b"",
    b"\xef\xbb\xbf",
    b'{"success": true, "code": 200, "StatutResponseList": [',
    b'{"success": true, "code": 200, "StatutResponseList": [{"status": "',
    b'{"success": false, "code": ',
    b"<?xml version='1.0' encoding='UTF-8'?><result><entry>true</entry><entry>200</entry>"
    b"<entry>1</entry><entry><entry>",
    b"<result><entry>",
    b"<!DOCTYPE result [<!ENTITY a 'Delivered'>]><result>",
)
# Pieces that make the bytes likelier to get deep into a parser before failing.
TOKENS = (
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b'"',
    b" ",
    b'"status"',
    b'"cost"',
    b'"stopMail"',
    b'"date"',
    b'"StatutResponseList"',
    b'"success"',
    b'"code"',
    b"true",
    b"false",
    b"null",
    b"1",
    b"-0.5e3",
    b"1e999",
    b'"Delivered"',
    b"\\u00e9",
    b"\\ud83d\\ude00",
    b"\\n",
    b"<entry>",
    b"</entry>",
    b"<![CDATA[x]]>",
    b"&amp;",
    b"&a;",
    b"&#233;",
    b"\xc3\xa9",
    b"\xff",
    b"\x00",
)
fuzz_bytes = st.builds(
    lambda prefix, parts: prefix + b"".join(parts),
    st.sampled_from(PREFIXES),
    st.lists(st.binary(max_size=8) | st.sampled_from(TOKENS), max_size=60),
)


@settings(FUZZ, max_examples=300)
@given(raw=st.binary(max_size=4096) | fuzz_bytes, fmt=st.sampled_from(sorted(PARSERS)))
def test_arbitrary_bytes_are_parsed_or_refused(raw: bytes, fmt: str) -> None:
    result = parse(fmt, raw)
    event(f"{fmt}: parsed" if result is not None else f"{fmt}: refused")
    if result is not None:
        assert_consistent(result, result.recipients)


# ---------------------------------------------------------------- (b) structured JSON

# Text without surrogates (json.dumps would escape lone ones; the corpus covers those).
text = st.text(max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
    | st.sampled_from(["Delivered", "Waiting", "1", "true", "0.5", "1764150000", "", " "])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(text | st.sampled_from(FIELDS), children, max_size=3)
    ),
    max_leaves=8,
)


def objects(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """``fields``, a few of them left out, plus random other keys (which must not matter)."""
    extras = st.dictionaries(text.filter(lambda k: k not in fields), json_values, max_size=2)
    return st.builds(
        lambda extra, known, dropped: {
            **extra,
            **{k: v for k, v in known.items() if k not in dropped},
        },
        extras,
        st.fixed_dictionaries(fields),
        st.sets(st.sampled_from(sorted(fields)), max_size=2),
    )


def mostly(usual: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` four times in five, any JSON value otherwise."""
    return st.one_of(usual, usual, usual, usual, json_values)


# Each field: mostly a value of the documented kind, else anything at all.
report_fields = {
    "email": mostly(text),
    "token": mostly(text),
    "status": mostly(st.sampled_from(KNOWN_STATUSES) | st.none() | st.integers(-(10**6), 10**6)),
    "cost": mostly(st.none() | st.integers(0, 100) | st.sampled_from(["0.5", " 1 ", "x"])),
    "stopMail": mostly(st.sampled_from([True, False, "true", "1", "no", 1, 0])),
    "date": mostly(st.integers(0, 4 * 10**9) | st.sampled_from(["1764150000", "x"])),
}
reports = mostly(objects(report_fields))
envelope_fields = {
    "success": mostly(st.just(True)),
    "code": mostly(st.sampled_from([200, "200", 200.0, None, 4, "10"])),
    "messageId": json_values,
    "message": json_values,
    LIST: mostly(st.lists(reports, max_size=5)),
}
envelopes = objects(envelope_fields)


@FUZZ
@given(
    document=mostly(envelopes),
    indent=st.sampled_from([None, 0, 2]),
    bom=st.booleans(),
)
def test_structured_json_is_parsed_or_refused(document: Any, indent: int | None, bom: bool) -> None:
    raw = (b"\xef\xbb\xbf" if bom else b"") + json.dumps(document, indent=indent).encode()
    result = parse("json", raw)
    event("parsed" if result is not None else "refused")
    if result is None:
        return
    # Parsed: a top-level object with a list of report objects, each one recipient.
    assert isinstance(document, dict)
    assert isinstance(document[LIST], list)
    assert all(isinstance(report, dict) for report in document[LIST])
    assert_consistent(result, len(document[LIST]))


# ---------------------------------------------------------------- (c) the reference


StopMail = bool | int | str | None


@dataclass(frozen=True)
class Report:
    """One recipient's report; a None field is left out of the JSON (empty in XML)."""

    status: str | None
    cost: float | int | str | None
    stop_mail: StopMail
    date: int | float | str | None

    def as_json(self) -> dict[str, object]:
        report: dict[str, object] = {"email": "a@example.com", "token": "t"}
        for key, value in [
            ("status", self.status),
            ("cost", self.cost),
            ("stopMail", self.stop_mail),
            ("date", self.date),
        ]:
            if value is not None:
                report[key] = value
        return report


def unsubscribes(stop_mail: object) -> bool:
    """The docstring's rule: true, the strings true or 1 (any case), or the number 1."""
    if isinstance(stop_mail, str):
        return stop_mail.strip().lower() in ("true", "1")
    return stop_mail is True or (type(stop_mail) is int and stop_mail == 1)


def reference(reports: list[Report]) -> MessageAggregate:
    """What the reports add up to, computed the obvious way."""
    status_map = StatusMap.default()
    names = [status_name(r.status) for r in reports]
    states = dict.fromkeys(State, 0)
    for name in names:
        states[status_map.state_of(name)] += 1
    statuses = Counter(names)
    if len(statuses) > MAX_STATUSES:
        ranked = sorted(statuses.items(), key=lambda kv: (-kv[1], kv[0]))
        kept = dict(ranked[: MAX_STATUSES - 1])
        folded = sum(count for _, count in ranked[MAX_STATUSES - 1 :])
        statuses = Counter({**kept, OTHER_STATUS: kept.get(OTHER_STATUS, 0) + folded})
    cost = 0.0
    for r in reports:
        cost += 0.0 if r.cost is None else float(r.cost)
    dates = [float(r.date) for r in reports if r.date is not None and float(r.date) > 0]
    return MessageAggregate(
        states=states,
        statuses=dict(sorted(statuses.items())),
        cost=cost,
        unsubscribed=sum(unsubscribes(r.stop_mail) for r in reports),
        last_report=max(dates, default=None),
    )


def same(result: MessageAggregate, expected: MessageAggregate) -> bool:
    return (
        dict(result.states) == dict(expected.states)
        and dict(result.statuses) == dict(expected.statuses)
        and result.cost == expected.cost
        and result.unsubscribed == expected.unsubscribed
        and result.last_report == expected.last_report
    )


# Characters XML 1.0 can carry (a carriage return only as &#13;).
xml_chars = st.characters(
    exclude_categories=("Cs", "Cc"),
    exclude_characters="\ufffe\uffff",
    include_characters="\t\n\r",
)
_status_core = st.text(xml_chars, min_size=1, max_size=10).filter(
    lambda s: s.strip()  # blank statuses: see the corpus
)
status_text = st.builds(
    lambda before, core, repeat, after: before + core * repeat + after,
    st.sampled_from(["", "", " ", "\t", "\n  "]),
    _status_core,
    st.sampled_from([1, 1, 1, 2, 20]),  # 20: past the 64-character cut
    st.sampled_from(["", "", " ", "\r\n"]),
)
costs = (
    st.none()
    | st.integers(min_value=0, max_value=10**6)
    | st.floats(min_value=-10, max_value=10**6, allow_nan=False)
    | st.decimals(min_value=0, max_value=100, places=4).map(str)
)
STOP_MAILS: list[StopMail] = [None, True, False, 1, 0, "true", " TRUE", "1", "0", "no"]
dates = (
    st.none()
    | st.integers(min_value=-5, max_value=4 * 10**9)
    | st.integers(min_value=1, max_value=4 * 10**9).map(str)
    | st.floats(min_value=1, max_value=4e9)
)


def status_name(status: str | None) -> str:
    """The status label a report should count under."""
    return MISSING if status is None else status.strip()[:MAX_STATUS_LENGTH].lower()


SPELLINGS: list[Callable[[str], str]] = [str, str.upper, str.swapcase]


@st.composite
def report_lists(draw: st.DrawFn) -> list[Report]:
    """Up to about 30 distinct statuses (one may be missing), each reported 1 to 3 times
    in any order and spelling: statuses repeat, tie, and pass the 20-status cap about half
    of the time. Each report's cost, stopMail and date come from a few drawn values,
    dealt out by a ``Random`` seeded with a drawn integer: much faster than drawing every
    field, and as reproducible."""
    if draw(st.booleans()):  # many: past the cap
        known, texts = list(KNOWN_STATUSES), draw(st.lists(status_text, min_size=8, max_size=20))
    else:
        known = draw(st.permutations(KNOWN_STATUSES))[: draw(st.integers(0, 12))]
        texts = draw(st.lists(status_text, max_size=6))
    missing = [None] if draw(st.booleans()) else []
    # One spelling per status name, so the distinct names are as many as drawn.
    pool = list({status_name(s): s for s in [*known, *texts, *missing]}.values())
    cost_pool = draw(st.lists(costs, min_size=1, max_size=6))
    date_pool = draw(st.lists(dates, min_size=1, max_size=6))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    order = [s for s in pool for _ in range(rnd.randint(1, 3))]
    rnd.shuffle(order)
    return [
        Report(
            None if status is None else rnd.choice(SPELLINGS)(status),
            rnd.choice(cost_pool),
            rnd.choice(STOP_MAILS),
            rnd.choice(date_pool),
        )
        for status in order
    ]


@FUZZ
@given(reports=report_lists())
def test_well_formed_reports_add_up_as_the_reference_says(reports: list[Report]) -> None:
    raw = json.dumps({"success": True, "code": 200, LIST: [r.as_json() for r in reports]}).encode()
    result = parse("json", raw)
    assert result is not None
    expected = reference(reports)
    over = len({status_name(r.status) for r in reports}) > MAX_STATUSES
    event("over the status cap" if over else "under the status cap")
    assert same(result, expected), (result, expected)


# ---------------------------------------------------------------- (d) JSON and XML agree


def xml_text(value: str, cdata: bool) -> str:
    if cdata and "]]>" not in value and "\r" not in value:
        return f"<![CDATA[{value}]]>"
    return escape(value).replace("\r", "&#13;")


def as_xml_field(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_xml(reports: list[Report], cdata: list[bool]) -> bytes:
    records = []
    for r, use_cdata in zip(reports, cdata, strict=True):
        values = ["a@example.com", "t", r.status, r.cost, r.stop_mail, r.date]
        records.append(
            "<entry>"
            + "".join(f"<entry>{xml_text(as_xml_field(v), use_cdata)}</entry>" for v in values)
            + "</entry>"
        )
    return (
        "<?xml version='1.0' encoding='UTF-8'?>\n<result><entry>true</entry><entry>200</entry>"
        f"<entry><![CDATA[300]]></entry><entry>{''.join(records)}</entry></result>"
    ).encode()


@FUZZ
@given(reports=report_lists(), seed=st.integers(0, 2**32 - 1))
def test_json_and_xml_renderings_aggregate_identically(reports: list[Report], seed: int) -> None:
    rnd = random.Random(seed)
    cdata = [rnd.random() < 0.5 for _ in reports]  # CDATA or escaped text, report by report
    as_json = json.dumps(
        {"success": True, "code": 200, "messageId": "300", LIST: [r.as_json() for r in reports]}
    ).encode()
    from_json = parse("json", as_json)
    from_xml = parse("xml", render_xml(reports, cdata))
    assert from_json is not None and from_xml is not None
    assert same(from_json, from_xml), (from_json, from_xml)


@settings(FUZZ, max_examples=300)
@given(
    code=st.integers(min_value=0, max_value=10**6).filter(lambda c: c != 200)
    | st.sampled_from(["E42", "x", "4 2", " 7 "]),
    message=st.text(xml_chars, max_size=40),
)
def test_json_and_xml_error_forms_agree(code: int | str, message: str) -> None:
    as_json = json.dumps({"success": False, "code": code, "message": message}).encode()
    as_xml = (
        "<?xml version='1.0' encoding='UTF-8'?><result><entry>false</entry>"
        f"<entry>{escape(str(code))}</entry><entry>{xml_text(message, False)}</entry></result>"
    ).encode()
    outcomes = []
    for fmt, raw in (("json", as_json), ("xml", as_xml)):
        aggregator = ReportAggregator(StatusMap.default())
        try:
            PARSERS[fmt](io.BytesIO(raw), aggregator)
        except UpstreamError as e:
            outcomes.append((e.code, e.message.strip()))
        else:
            raise AssertionError(f"{fmt}: an error form was parsed")
    assert outcomes[0] == outcomes[1]
    text = str(code).strip()
    assert outcomes[0][0] == (text if text.isascii() and text.isdigit() else "invalid")
