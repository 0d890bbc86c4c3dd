"""The values every layer speaks of: a message to track, and where a recipient stands.

Nothing here imports from the rest of the package, so the parser, the tracker, the state
store and the collector can share these types without pulling in the config loader.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class State(enum.StrEnum):
    """Where a recipient stands; the ``state`` label of the recipient metrics."""

    DELIVERED = "delivered"
    FAILED = "failed"
    PENDING = "pending"
    UNKNOWN = "unknown"


DEFAULT_STATUSES: Mapping[State, tuple[str, ...]] = MappingProxyType(
    {
        State.DELIVERED: ("delivered",),
        State.FAILED: ("not delivered", "ko", "bounced", "failed", "rejected"),
        State.PENDING: ("waiting", "pending", "queued"),
    }
)


@dataclass(frozen=True)
class StatusMap:
    """Raw upstream status (any case) to state; anything unlisted is ``unknown``.

    This is where a status becomes a state (``status_map`` in the config).
    """

    states: Mapping[str, State]

    @classmethod
    def default(cls) -> StatusMap:
        return cls.from_lists(DEFAULT_STATUSES)

    @classmethod
    def from_lists(cls, lists: Mapping[State, tuple[str, ...]]) -> StatusMap:
        return cls(MappingProxyType({raw.lower(): s for s, raws in lists.items() for raw in raws}))

    def state_of(self, raw_status: str) -> State:
        return self.states.get(raw_status.lower(), State.UNKNOWN)


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """A message to track: its upstream ID, extra labels, when it was sent and, for a deferred
    send, when it is to go out; a ``transactional`` one is never held by the platform."""

    id: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    sent_at: float | None = None
    scheduled_at: float | None = None
    transactional: bool = False
