"""What every route of the HTTP side shares: the WSGI types and how an answer is written."""

from __future__ import annotations

import json
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
    return respond(start_response, status, json.dumps(payload) + "\n", "application/json", headers)
