"""The keyless XML form (``_format=xml``) streamed into a ``ReportAggregator``."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from exporter.aggregate import ReportAggregator
from exporter.parse.report import MAX_DEPTH, Body, InvalidResponse, add, check_envelope, short
from exporter.parse.shape import MAIL, ReportShape


def parse_xml(body: Body, aggregator: ReportAggregator, shape: ReportShape = MAIL) -> None:
    """Stream the keyless ``<result><entry>…`` form into ``aggregator``.

    Entries are positional: success, code, messageId (or the error message),
    then a list entry holding one entry per recipient, which holds one entry per report
    key of ``shape``, in order (Mail Partner: email, token, status, cost, stopMail, date).
    Every element is an ``<entry>``: shapes differ only in the positions, and an optional
    cost is told by the number of values.
    """
    places = {len(keys): _places(keys, shape.stop_key) for keys in shape.layouts}
    widths = " or ".join(map(_in_words, sorted(places)))
    top: list[str] = []
    reports: ET.Element | None = None
    depth = 0
    try:
        # expat (>= 2.4.1, bundled with Python 3.11) refuses entity-expansion
        # bombs, and ElementTree never fetches external entities.
        for event, element in ET.iterparse(body, events=("start", "end")):  # noqa: S314
            if event == "start":
                depth += 1
                if depth > MAX_DEPTH:
                    raise InvalidResponse(f"XML nested deeper than {MAX_DEPTH} levels")
                if depth == 1 and element.tag != "result":
                    raise InvalidResponse(f"XML root is <{element.tag}>, not <result>")
                if depth == 2 and len(top) == 3:
                    reports = element
                continue
            depth -= 1
            if depth == 2 and reports is not None:
                fields = [(child.text or "").strip() for child in element]
                place = places.get(len(fields))
                if place is None or len(element.findall("./*/*")):
                    raise InvalidResponse(f"an XML recipient entry does not hold {widths} values")
                status_at, cost_at, stop_at, date_at = place
                cost = None if cost_at is None else fields[cost_at] or None
                add(aggregator, fields[status_at] or None, cost, fields[stop_at], fields[date_at])
                reports.clear()  # done with it: the tree must not grow with the send
            elif depth == 1:
                top.append((element.text or "").strip())
                element.clear()
    except ET.ParseError as e:
        raise InvalidResponse(f"malformed XML: {e}") from None
    except (ValueError, LookupError) as e:  # an encoding expat cannot read
        raise InvalidResponse(f"unsupported XML encoding: {short(e)}") from None
    if not top:
        raise InvalidResponse("XML body holds no entries")
    success = {"true": True, "false": False}.get(top[0].lower(), top[0])
    code = top[1] if len(top) > 1 else None
    message = top[2] if len(top) > 2 and not success else None
    check_envelope(success, code, message, success is True and len(top) == 4, shape.list_key)


def _places(keys: tuple[str, ...], stop_key: str) -> tuple[int, int | None, int, int]:
    """Where status, cost (None if left out), the flag and date are among ``keys``."""
    cost = keys.index("cost") if "cost" in keys else None
    return keys.index("status"), cost, keys.index(stop_key), keys.index("date")


def _in_words(number: int) -> str:
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return words[number] if number < len(words) else str(number)
