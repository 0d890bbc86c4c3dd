"""What a state file holds, as values, and how each becomes a row and back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from exporter.aggregate import MessageAggregate
from exporter.domain import MessageSpec, State
from exporter.totals import Tally, TotalsSnapshot

# exporter.tracker.Phase values; not imported, as the tracker is this module's caller.
PHASES = frozenset({"active", "settled", "final"})


@dataclass(frozen=True)
class StoredMessage:
    id: str
    first_seen: float
    phase: str  # an exporter.tracker.Phase value
    final_at: float | None
    last_success: float | None
    aggregate: MessageAggregate | None
    first_report: float | None = None  # when its life began (exporter.schedule)


@dataclass(frozen=True)
class StoredState:
    messages: Mapping[str, StoredMessage]
    totals: TotalsSnapshot
    saved_at: float
    registered: tuple[MessageSpec, ...] = ()  # over HTTP, in the order they came


def aggregate_row(labels: Mapping[str, str], t: Tally) -> tuple[Any, ...]:
    recipients = json.dumps({str(s): n for s, n in t.recipients.items()})
    delays = json.dumps(t.delays)
    return (json.dumps(labels), recipients, t.cost, t.unsubscribed, t.messages, delays, t.delay_sum)


def tally_from_row(row: tuple[Any, ...]) -> tuple[dict[str, str], Tally]:
    labels, recipients, cost, unsubscribed, messages, delays, delay_sum = row
    by_state = dict.fromkeys(State, 0)
    by_state.update({State(s): n for s, n in _counts(recipients).items()})
    tally = Tally(
        by_state,
        float(cost),
        int(unsubscribed),
        int(messages),
        [int(n) for n in json_list(delays)],
        float(delay_sum),
    )
    return {k: str(v) for k, v in _object(labels, "labels").items()}, tally


def message_row(m: StoredMessage) -> tuple[Any, ...]:
    if m.phase not in PHASES:  # or the next load would find the file corrupt
        raise ValueError(f"message {m.id}: unknown phase {m.phase!r}")
    head = (m.id, m.first_seen, str(m.phase), m.final_at, m.last_success)
    a = m.aggregate
    if a is None:
        return (*head, None, None, None, None, None, None, None, m.first_report)
    states = json.dumps({str(s): n for s, n in a.states.items()})
    values = (json.dumps(dict(a.statuses)), a.cost, a.unsubscribed, a.last_report)
    return (*head, states, *values, json.dumps(a.delays), a.delay_sum, m.first_report)


def message_from_row(row: tuple[Any, ...]) -> StoredMessage:
    id_, first_seen, phase, final_at, last_success, states, statuses, cost, unsub, last = row[:10]
    delays, delay_sum, first_report = row[10:]
    if phase not in PHASES:
        raise ValueError(f"message {id_}: unknown phase {phase!r}")
    aggregate = None
    if states is not None:
        by_state = dict.fromkeys(State, 0)
        by_state.update({State(s): n for s, n in _counts(states).items()})
        aggregate = MessageAggregate(
            states=MappingProxyType(by_state),
            statuses=MappingProxyType(_counts(statuses)),
            cost=float(cost),
            unsubscribed=int(unsub),
            last_report=_optional(last),
            delays=tuple(int(n) for n in json_list(delays or "[]")),
            delay_sum=float(delay_sum or 0.0),
        )
    first, final, success = float(first_seen), _optional(final_at), _optional(last_success)
    return StoredMessage(
        str(id_), first, str(phase), final, success, aggregate, _optional(first_report)
    )


def spec_from_row(
    id_: Any, labels: str, sent_at: Any, scheduled_at: Any, transactional: Any
) -> MessageSpec:
    by_name = {k: str(v) for k, v in _object(labels, "labels").items()}
    return MessageSpec(
        str(id_),
        MappingProxyType(by_name),
        _optional(sent_at),
        _optional(scheduled_at),
        bool(transactional),
    )


def _counts(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in _object(text, "counts").items()}


def json_list(text: str) -> list[Any]:
    value = json.loads(text)
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {text[:40]!r}")
    return value


def _object(text: str, what: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise TypeError(f"expected {what}, got {text[:40]!r}")
    return value


def _optional(value: Any) -> float | None:
    return None if value is None else float(value)
