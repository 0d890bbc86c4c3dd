"""What the upstream APIs answer, computed from a World (no sockets here).

``PartnerApi`` holds what Mail Partner and its sister SMS Partner (``sms.py``) share: the key
check, the error envelope and codes, and their order.  Each flavour renders its own payloads.
``/me`` uses SMS Partner's documented layout for both, since Mail Partner's is undocumented;
its credits derive from the sends so that tests can predict them: a fixed starting allowance
less one per recipient sent, a starting balance less every send's cost, and ``toSend`` the
recipients still waiting for their report right now.

``message-cancel`` answers as SMS Partner documents its own (Mail Partner's page gives no
codes): ``{"success": true, "code": 200, "message": …}``, or code 5 for a send cancelled
already, 6 within 5 minutes of its going out, 7 for one that was not deferred or has gone out.
A cancelled send is unknown from then on: bulk-status answers code 4, as for any unknown ID.
"""

from __future__ import annotations

import hmac
from abc import ABC, abstractmethod
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
from exporter.simulator.model import (
    AlreadyCancelled,
    CannotCancel,
    NotCancellable,
    TooLateToCancel,
    World,
)

ERROR_MESSAGES: Mapping[int, str] = {
    1: "La Clé API est requise",
    3: "L\u2019ID du message est requis",  # upstream's typographic apostrophe
    4: "Message introuvable",
    # message-cancel's refusals: the codes SMS Partner documents for its own.
    5: "L\u2019envoi a déjà été annulé",
    6: "Impossible d\u2019annuler un envoi moins de 5 minutes avant son départ",
    7: "Impossible d\u2019annuler un envoi déjà parti",
    10: "Clé API incorrecte",
    429: "Too many requests",
}
STARTING_BALANCE = 500.0
STARTING_MAIL_CREDITS = 100_000
CANCELLED = "L\u2019envoi a été annulé"
_CANCEL_CODES: Mapping[type[CannotCancel], int] = {
    AlreadyCancelled: 5,
    TooLateToCancel: 6,
    NotCancellable: 7,
}
USER: Mapping[str, str] = {"username": "demo", "firstname": "Demo", "lastname": "Simulator"}

Query = Mapping[str, str]


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """What an account's sends have used up so far."""

    recipients: int
    cost: float
    waiting: int  # recipients whose report has not arrived yet

    @classmethod
    def of(cls, world: World) -> Usage:
        sends = world.sends()
        return cls(
            recipients=sum(s.recipients for s in sends),
            cost=sum(s.recipients * s.cost_per_recipient for s in sends),
            waiting=world.waiting(),
        )


def money(amount: float) -> str:
    """A euro amount as ``/me`` writes it: a string with three decimals."""
    return f"{amount:.3f}"


def wants_xml(query: Query) -> bool:
    return query.get("_format", "").lower() == "xml"


def error_reply(
    code: int, query: Query, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> Reply:
    """The upstream error document; both APIs report API errors with HTTP 200."""
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


class PartnerApi(ABC):
    """The two endpoints the exporter uses, with upstream's error codes and their order."""

    def __init__(self, world: World, api_key: str) -> None:
        self.world = world
        self._api_key = api_key.encode()

    def bulk_status(self, query: Query, *, reject_key: bool = False) -> Reply:
        message_id = self._message_id(query, reject_key)
        if isinstance(message_id, Reply):
            return message_id
        if self.world.get(message_id) is None:
            return error_reply(4, query)
        return _success(self.status_payload(message_id), query)

    def message_cancel(self, query: Query, *, reject_key: bool = False) -> Reply:
        """Cancel a deferred send, on the world's clock."""
        message_id = self._message_id(query, reject_key)
        if isinstance(message_id, Reply):
            return message_id
        try:
            self.world.cancel(message_id)
        except KeyError:
            return error_reply(4, query)
        except CannotCancel as refused:
            return error_reply(_CANCEL_CODES[type(refused)], query)
        return _success({"success": True, "code": 200, "message": CANCELLED}, query)

    def me(self, query: Query, *, reject_key: bool = False) -> Reply:
        key_error = self._key_error(query, reject_key)
        if key_error is not None:
            return error_reply(key_error, query)
        payload = {
            "success": True,
            "code": 200,
            "user": dict(USER),
            "credits": self.credits(Usage.of(self.world)),
        }
        return _success(payload, query)

    def _message_id(self, query: Query, reject_key: bool) -> str | Reply:
        """The request's ``messageId``, or the error a missing key or ID gets (1, 10, 3)."""
        key_error = self._key_error(query, reject_key)
        if key_error is not None:
            return error_reply(key_error, query)
        return query.get("messageId", "") or error_reply(3, query)

    @abstractmethod
    def status_payload(self, message_id: str) -> Payload:
        """The bulk-status document of a message known to exist."""

    @abstractmethod
    def credits(self, usage: Usage) -> Payload:
        """``/me``'s ``credits`` object once ``usage`` is spent."""

    def _key_error(self, query: Query, reject_key: bool) -> int | None:
        key = query.get("apiKey", "")
        if not key:
            return 1
        if reject_key or not hmac.compare_digest(key.encode(), self._api_key):
            return 10
        return None


class MailPartnerApi(PartnerApi):
    """api.mailpartner.fr ``/v1``.

    ``/me`` answers, e.g.: ``"credits": {"creditMail": 99000, "toSend": 0, "solde": "489.500",
    "currency": "EUR", "balance": "489.500"}``.
    """

    def status_payload(self, message_id: str) -> Payload:
        reports = [
            {
                "email": report.email,
                "token": report.token,
                "status": report.status,
                "cost": report.cost,
                "stopMail": report.stop_mail,
                "date": str(report.date),
            }
            for report in self.world.reports(message_id)
        ]
        return {
            "success": True,
            "code": 200,
            "messageId": message_id,
            "StatutResponseList": reports,
        }

    def credits(self, usage: Usage) -> Payload:
        balance = money(STARTING_BALANCE - usage.cost)
        return {
            "creditMail": max(0, STARTING_MAIL_CREDITS - usage.recipients),
            "toSend": usage.waiting,
            "solde": balance,
            "currency": "EUR",
            "balance": balance,
        }
