"""What api.mailpartner.fr answers on ``/v1``, computed from a World (no sockets here)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from exporter.simulator.formats import (
    JSON_CONTENT_TYPE,
    XML_CONTENT_TYPE,
    Payload,
    render_json,
    render_xml,
    render_xml_error,
)
from exporter.simulator.model import World

ERROR_MESSAGES: Mapping[int, str] = {
    1: "La Clé API est requise",
    3: "L\u2019ID du message est requis",  # upstream's typographic apostrophe
    4: "Message introuvable",
    10: "Clé API incorrecte",
    429: "Too many requests",
}
STARTING_BALANCE = 500.0
# Price used to turn the euro balance into a count of e-mails the account can still send.
MAIL_PRICE = 0.0105

Query = Mapping[str, str]


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


def wants_xml(query: Query) -> bool:
    return query.get("_format", "").lower() == "xml"


def error_reply(
    code: int, query: Query, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> Reply:
    """The upstream error document; Mail Partner reports API errors with HTTP 200."""
    message = ERROR_MESSAGES.get(code, "Une erreur est survenue")
    extra = dict(headers or {})
    if wants_xml(query):
        return Reply(status, XML_CONTENT_TYPE, render_xml_error(code, message), extra)
    body = render_json({"success": False, "code": code, "message": message})
    return Reply(status, JSON_CONTENT_TYPE, body, extra)


def _success(payload: Payload, query: Query) -> Reply:
    if wants_xml(query):
        return Reply(200, XML_CONTENT_TYPE, render_xml(payload))
    return Reply(200, JSON_CONTENT_TYPE, render_json(payload))


class UpstreamApi:
    """The two endpoints the exporter uses, with upstream's error codes and their order."""

    def __init__(self, world: World, api_key: str) -> None:
        self._world = world
        self._api_key = api_key.encode()

    def bulk_status(self, query: Query, *, reject_key: bool = False) -> Reply:
        key_error = self._key_error(query, reject_key)
        if key_error is not None:
            return error_reply(key_error, query)
        message_id = query.get("messageId", "")
        if not message_id:
            return error_reply(3, query)
        if self._world.get(message_id) is None:
            return error_reply(4, query)
        reports = [
            {
                "email": report.email,
                "token": report.token,
                "status": report.status,
                "cost": report.cost,
                "stopMail": report.stop_mail,
                "date": str(report.date),
            }
            for report in self._world.reports(message_id)
        ]
        payload = {
            "success": True,
            "code": 200,
            "messageId": message_id,
            "StatutResponseList": reports,
        }
        return _success(payload, query)

    def me(self, query: Query, *, reject_key: bool = False) -> Reply:
        key_error = self._key_error(query, reject_key)
        if key_error is not None:
            return error_reply(key_error, query)
        spent = sum(s.recipients * s.cost_per_recipient for s in self._world.sends())
        balance = round(STARTING_BALANCE - spent, 4)
        payload = {
            "success": True,
            "code": 200,
            "user": {"username": "demo"},
            "credits": {"balance": balance, "mailCredits": max(0, int(balance / MAIL_PRICE))},
        }
        return _success(payload, query)

    def _key_error(self, query: Query, reject_key: bool) -> int | None:
        key = query.get("apiKey", "")
        if not key:
            return 1
        if reject_key or not hmac.compare_digest(key.encode(), self._api_key):
            return 10
        return None
