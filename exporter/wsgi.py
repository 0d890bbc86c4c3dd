"""What every route of the HTTP side shares: the WSGI types and how an answer is written."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
TEXT = "text/plain; charset=utf-8"


def respond(
    start_response: StartResponse,
    status: str,
    body: bytes | str,
    content_type: str = TEXT,
    headers: Sequence[tuple[str, str]] = (),
) -> list[bytes]:
    """Answer ``body`` whole, with its length."""
    data = body.encode() if isinstance(body, str) else body
    start_response(
        status, [("Content-Type", content_type), ("Content-Length", str(len(data))), *headers]
    )
    return [data]


def respond_json(
    start_response: StartResponse,
    status: str,
    payload: object,
    headers: Sequence[tuple[str, str]] = (),
) -> list[bytes]:
    """Answer ``payload`` as standard JSON: a NaN or infinite float, which JSON has no word
    for (Python would write ``NaN``, which strict parsers refuse), is written ``null``."""
    try:
        text = json.dumps(payload, allow_nan=False)
    except ValueError:  # rare: only then is the payload walked
        text = json.dumps(_finite(payload), allow_nan=False)
    return respond(start_response, status, text + "\n", "application/json", headers)


def _finite(value: object) -> object:
    """``value`` with every non-finite float in it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
