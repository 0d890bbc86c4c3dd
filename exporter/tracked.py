"""One tracked message as the book holds it, its phase, and which messages get series."""

from __future__ import annotations

import enum
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from exporter.aggregate import MessageAggregate
from exporter.domain import MessageSpec


class Phase(enum.StrEnum):
    ACTIVE = "active"
    SETTLED = "settled"
    FINAL = "final"


@dataclass(frozen=True, slots=True)
class TrackedMessage:
    """One message's state; replaced whole on every change, so snapshots stay consistent."""

    spec: MessageSpec
    first_seen: float
    next_poll: float
    interval: float
    phase: Phase = Phase.ACTIVE
    aggregate: MessageAggregate | None = None
    last_poll: float | None = None
    last_success: float | None = None
    last_error: str = ""
    poll_ok: bool = False
    final_at: float | None = None
    in_flight: bool = False
    failures: int = 0  # consecutive failed polls
    not_found: bool = False  # final because the API never knew it
    first_report: float | None = None  # when its life began: see exporter.schedule
    held_until: float | None = None  # nothing reported, and held by the platform until then
    unreported: bool = False  # final after polling.unreported_max with nothing reported

    @property
    def sent_at(self) -> float:
        return self.spec.sent_at if self.spec.sent_at is not None else self.first_seen

    @property
    def start(self) -> float:
        """When it went, or is to go, out (``scheduled_at`` for a deferred send): its age, and
        its recipients' delivery delays, count from here."""
        return self.spec.scheduled_at if self.spec.scheduled_at is not None else self.sent_at


# The phases shown (``{prefix}_exporter_messages{phase}``, the status page): the tracker's,
# with an active message not gone out yet told apart.
SHOWN_PHASES = ("active", "settled", "final", "held", "scheduled")


def shown_phase(message: TrackedMessage) -> str:
    """``scheduled``: a deferred send not polled yet; ``held``: nothing reported, and the
    platform holds it until ``held_until``; otherwise the tracker's phase."""
    if message.phase != Phase.ACTIVE:
        return message.phase.value
    if message.spec.scheduled_at is not None and message.last_poll is None:
        return "scheduled"
    return "held" if message.held_until is not None else "active"


def with_series(messages: Sequence[TrackedMessage], limit: int) -> Sequence[TrackedMessage]:
    """The messages that get per-message series (``metrics.per_message_limit``): unfinished
    ones first, then the newest sent."""
    if len(messages) <= limit:
        return messages
    return heapq.nsmallest(limit, messages, key=_series_order)


def _series_order(message: TrackedMessage) -> tuple[bool, float, str]:
    return message.phase == Phase.FINAL, -message.sent_at, message.spec.id
