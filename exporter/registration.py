"""``/api/v1/messages``: a sending application registers each message right after sending.

``POST /api/v1/messages`` with ``{"id": "300", "labels": {"campaign": "x"}, "sent_at":
"2026-11-26T10:00:00Z"}`` (``source`` picks another bulk-status source, such as
``smspartner_bulk_status``) answers 201 when the message is new or changed, 200 when it
was registered as is, 400 with the problems (checked like the config's ``messages``).
``DELETE /api/v1/messages/ID`` stops tracking it; ``GET /api/v1/messages`` lists them (this
shard's). When sharded, a ``POST`` or ``DELETE`` for a message of another shard goes on to it
(``exporter.forward``), or is refused with 421, and nothing is registered here.
Answers are JSON in the Prometheus API's style: ``{"status": "success", "data": …}`` or
``{"status": "error", "errorType": …, "error": …}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

from exporter.config.errors import ConfigErrors
from exporter.config.reader import parse_message
from exporter.domain import MessageSpec
from exporter.forward import Forwarder, Refused
from exporter.shard import Shard
from exporter.sources.bulk_status import BulkStatusSource, RegistrationsFull
from exporter.wsgi import StartResponse, WSGIApp, respond, respond_json

PATH = "/api/v1/messages"
MAX_BODY = 64 * 1024
DEFAULT_SOURCE = "bulk_status"
_WHERE = "request body"
# The answer to a request for another shard's message (environ, start_response, ID, body);
# None when it is this shard's.
_Elsewhere = Callable[[dict[str, Any], StartResponse, str, bytes | None], list[bytes] | None]
_DISABLED = (
    "registration is not enabled: start the exporter with --web.enable-registration"
    " to allow POST and DELETE"
)


def messages_app(
    sources: Callable[[], Mapping[str, BulkStatusSource]],
    changed: Callable[[], None] = lambda: None,
    *,
    writable: bool = True,
    shard: Callable[[], Shard] = lambda: Shard.ALL,
    forwarder: Forwarder | None = None,
) -> WSGIApp:
    """The WSGI app behind ``/api/v1/messages`` and ``/api/v1/messages/<id>``; ``changed``
    is called after each registration or removal (to save the state without delay).
    Without ``writable`` (``--web.enable-registration``) only ``GET`` is served. ``shard`` is
    this exporter's at each request (a reload may change it); ``forwarder`` sends a request
    for another shard's message on to that shard."""
    forward = forwarder or Forwarder()

    def elsewhere(
        environ: dict[str, Any], start_response: StartResponse, message_id: str, body: bytes | None
    ) -> list[bytes] | None:
        """The answer to a request for another shard's message; None if it is this one's."""
        outcome = forward.route(shard(), message_id, environ, body)
        if outcome is None:
            return None
        if isinstance(outcome, Refused):
            return _error(start_response, outcome.status, outcome.kind, outcome.error)
        return respond(
            start_response, outcome.status, outcome.body, outcome.content_type, outcome.headers
        )

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO") or ""
        query = parse_qs(environ.get("QUERY_STRING") or "")
        # The server decoded the path once (as Latin-1, per WSGI): an ID is taken as sent,
        # ``%25`` and all, never unquoted a second time.
        message_id = _wsgi_text(path[len(PATH) + 1 :]) if path.startswith(PATH + "/") else None
        if method in ("POST", "DELETE") and not writable:
            return _error(start_response, "404 Not Found", "not_found", _DISABLED)
        if method == "POST" and message_id is None:
            return _post(environ, start_response, sources(), changed, elsewhere)
        if method == "DELETE" and message_id:
            if (answer := elsewhere(environ, start_response, message_id, None)) is not None:
                return answer
            name = query.get("source", [DEFAULT_SOURCE])[0]
            return _delete(start_response, sources().get(name), name, message_id, changed)
        if method == "GET" and message_id is None:
            data = [
                {**_message(spec), "source": name}
                for name, source in sorted(sources().items())
                for spec in source.registered()
            ]
            return respond_json(start_response, "200 OK", {"status": "success", "data": data})
        allowed = "GET, POST" if message_id is None else "DELETE"
        return _error(
            start_response,
            "405 Method Not Allowed",
            "bad_data",
            f"use {allowed}",
            [("Allow", allowed)],
        )

    return app


def _post(
    environ: dict[str, Any],
    start_response: StartResponse,
    sources: Mapping[str, BulkStatusSource],
    changed: Callable[[], None],
    elsewhere: _Elsewhere,
) -> Iterable[bytes]:
    try:
        spec, extra, body = _read(environ)
    except _BadRequest as e:
        return _error(start_response, e.status, "bad_data", e.error)
    # Checked here first: a bad one costs no hop, and the owner would say the same.
    if (forwarded := elsewhere(environ, start_response, spec.id, body)) is not None:
        return forwarded
    name = extra.get("source", DEFAULT_SOURCE)
    source = sources.get(name) if isinstance(name, str) else None
    if source is None:
        return _error(start_response, "400 Bad Request", "bad_data", _no_source(name))
    try:
        created = source.register(spec)
    except RegistrationsFull as e:
        return _error(start_response, "503 Service Unavailable", "unavailable", str(e))
    if created:
        changed()
    status = "201 Created" if created else "200 OK"
    answer: dict[str, Any] = {"status": "success", "data": {**_message(spec), "source": name}}
    if (volatile := source.volatile) is not None:
        # Prometheus's API carries such news in "warnings"; the state is still tracked.
        answer["warnings"] = [
            f"not saved: {volatile}; this registration will not survive a restart"
        ]
    return respond_json(start_response, status, answer)


class _BadRequest(Exception):
    def __init__(self, status: str, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def _read(environ: dict[str, Any]) -> tuple[MessageSpec, dict[str, Any], bytes]:
    """The message a ``POST`` registers, its other keys (``source``) and the body as sent."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    if not 0 < length <= MAX_BODY:
        raise _BadRequest(
            "413 Content Too Large" if length > MAX_BODY else "400 Bad Request",
            f"send one JSON object of at most {MAX_BODY} bytes, with Content-Length",
        )
    body = environ["wsgi.input"].read(length)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise _BadRequest("400 Bad Request", "the body is not JSON") from None
    try:
        spec, extra = parse_message(document, _WHERE, frozenset({"source"}))
    except ConfigErrors as e:
        raise _BadRequest("400 Bad Request", str(e)) from None
    return spec, extra, body


def _delete(
    start_response: StartResponse,
    source: BulkStatusSource | None,
    name: str,
    message_id: str,
    changed: Callable[[], None],
) -> Iterable[bytes]:
    if source is None:
        return _error(start_response, "400 Bad Request", "bad_data", _no_source(name))
    if not source.unregister(message_id):
        return _error(start_response, "404 Not Found", "not_found", "not registered")
    changed()
    return respond_json(start_response, "200 OK", {"status": "success", "data": {"id": message_id}})


def _wsgi_text(path: str) -> str:
    """A WSGI path (bytes as Latin-1) as the UTF-8 text the client sent; Latin-1 if not UTF-8."""
    raw = path.encode("latin-1", "replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return path


def _message(spec: MessageSpec) -> dict[str, Any]:
    message = {"id": spec.id, "labels": dict(spec.labels), "sent_at": spec.sent_at}
    if spec.scheduled_at is not None:
        message["scheduled_at"] = spec.scheduled_at
    if spec.transactional:
        message["transactional"] = True
    return message


def _no_source(name: object) -> str:
    return f"{_WHERE}: source: {name!r} is not an enabled bulk-status source"


def _error(
    start_response: StartResponse,
    status: str,
    kind: str,
    error: str,
    headers: Sequence[tuple[str, str]] = (),
) -> list[bytes]:
    """An answer in the Prometheus API's error style."""
    payload = {"status": "error", "errorType": kind, "error": error}
    return respond_json(start_response, status, payload, headers)
