"""Mail Partner's two wire formats: JSON and the keyless ``<result><entry>`` XML.

The XML mirrors the upstream page byte for byte in shape: a document is the payload's values
in order with their keys dropped, strings sit in CDATA on a line of their own (so a consumer
must strip the whitespace around them), numbers and booleans are bare, and nested objects or
lists become nested ``<entry>`` elements.  Errors use a different, flatter form with a
single-quoted XML declaration and the message as plain text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from xml.sax.saxutils import escape

JSON_CONTENT_TYPE = "application/json"
XML_CONTENT_TYPE = "application/xml; charset=utf-8"

Payload = Mapping[str, object]

_INDENT = "  "


def render_json(payload: Payload) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def render_xml(payload: Payload) -> bytes:
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<result>"]
    for value in payload.values():
        _entry(value, 1, lines)
    lines.append("</result>")
    return ("\n".join(lines) + "\n").encode()


def render_xml_error(code: int, message: str) -> bytes:
    return (
        "<?xml version='1.0' encoding='UTF-8'?>\n"
        "<result>\n"
        f"{_INDENT}<entry>false</entry>\n"
        f"{_INDENT}<entry>{code}</entry>\n"
        f"{_INDENT}<entry>{escape(message)}</entry>\n"
        "</result>\n"
    ).encode()


def _entry(value: object, depth: int, lines: list[str]) -> None:
    pad = _INDENT * depth
    if isinstance(value, Mapping):
        _nested(list(value.values()), depth, lines)
    elif isinstance(value, list | tuple):
        _nested(list(value), depth, lines)
    elif isinstance(value, str):
        # "]]>" cannot appear inside CDATA; split it across two sections.
        cdata = value.replace("]]>", "]]]]><![CDATA[>")
        lines += [f"{pad}<entry>", f"{pad}{_INDENT}<![CDATA[{cdata}]]>", f"{pad}</entry>"]
    elif isinstance(value, bool):
        lines.append(f"{pad}<entry>{'true' if value else 'false'}</entry>")
    else:
        lines.append(f"{pad}<entry>{value}</entry>")


def _nested(values: list[object], depth: int, lines: list[str]) -> None:
    pad = _INDENT * depth
    lines.append(f"{pad}<entry>")
    for value in values:
        _entry(value, depth + 1, lines)
    lines.append(f"{pad}</entry>")
