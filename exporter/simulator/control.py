"""What a test can steer from outside: the fault knobs and the ``/sim/*`` request bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict, TypeVar, cast, get_args, get_type_hints

RATE_LIMIT_STYLES = ("http", "json")
MAIL, SMS = "mail", "sms"
APIS = (MAIL, SMS)

T = TypeVar("T")


@dataclass
class Faults:
    """Mutable knobs, read afresh by every API request of the flavour they belong to."""

    latency: float = 0.0
    error_code: int | None = None
    http_status: int | None = None
    invalid_body: bool = False
    reject_key: bool = False
    rate_limit_style: str = "http"  # "http": HTTP 429; "json": HTTP 200 with code 429
    retry_after: int | None = None
    gzip: bool = False


class SendOptions(TypedDict, total=False):
    campaign: str
    sent_at: float
    message_id: str
    commercial: bool
    scheduled_at: float


def _json_object(body: bytes) -> dict[str, object]:
    document = json.loads(body or b"{}")
    if not isinstance(document, dict):
        raise ValueError("expected a JSON object")
    return document


def _typed(name: str, value: object, hint: object) -> object:
    allowed = get_args(hint) or (hint,)
    # JSON has one number type; a bool is an int to isinstance() but never a valid number here.
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed:
        value = float(value)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise ValueError(f"{name}: {value!r} is not a valid {hint}")
    return value


def parse_api(value: object) -> str | None:
    """The flavour an ``api`` field or parameter names (``mail`` or ``sms``); None if absent."""
    if value is None:
        return None
    if value not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {value!r}")
    return value


def apply_faults(faults: Mapping[str, Faults], body: bytes) -> Faults:
    """Set the knobs named in a JSON object on the flavour its ``api`` names, or on every
    flavour without one; nothing changes if any of them is invalid.  Returns the knobs of
    the flavour named, Mail Partner's without one."""
    document = _json_object(body)
    api = parse_api(document.pop("api", None))
    hints = get_type_hints(Faults)
    changes = {}
    for name, value in document.items():
        if name not in hints:
            raise ValueError(f"unknown fault {name!r}")
        changes[name] = _typed(name, value, hints[name])
    if changes.get("rate_limit_style", "http") not in RATE_LIMIT_STYLES:
        raise ValueError(f"rate_limit_style must be one of {RATE_LIMIT_STYLES}")
    for target in faults.values() if api is None else (faults[api],):
        for name, value in changes.items():
            setattr(target, name, value)
    return faults[api or MAIL]


def parse_send(body: bytes) -> tuple[str, int, SendOptions]:
    """``{"recipients": N, "campaign"?, "sent_at"?, "messageId"?, "commercial"?,
    "scheduled_at"?, "api"?}`` as the flavour to send on (Mail Partner without ``api``) and
    ``World.send`` arguments."""
    document = _json_object(body)
    fields = {"recipients", "campaign", "sent_at", "messageId", "commercial", "scheduled_at"}
    unknown = document.keys() - fields - {"api"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    api = parse_api(document.get("api")) or MAIL
    options = SendOptions()
    if "campaign" in document:
        options["campaign"] = _field(document, "campaign", str)
    if "sent_at" in document:
        options["sent_at"] = _field(document, "sent_at", float)
    if "messageId" in document:
        options["message_id"] = _field(document, "messageId", str)
    if "commercial" in document:
        options["commercial"] = _field(document, "commercial", bool)
    if "scheduled_at" in document:
        options["scheduled_at"] = _field(document, "scheduled_at", float)
    return api, _field(document, "recipients", int), options


def _field(document: Mapping[str, object], name: str, kind: type[T]) -> T:
    return cast(T, _typed(name, document.get(name), kind))
