"""The configuration as frozen, typed objects (see SPEC §4)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from exporter.secret import Secret
from exporter.shard import Shard

DEFAULT_BASE_URL = "https://api.mailpartner.fr/v1"
DEFAULT_STATE_PATH = "mailpartner-exporter.db"


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
    """Raw upstream status (any case) to state; anything unlisted is ``unknown``."""

    states: Mapping[str, State]

    @classmethod
    def default(cls) -> StatusMap:
        return cls.from_lists(DEFAULT_STATUSES)

    @classmethod
    def from_lists(cls, lists: Mapping[State, tuple[str, ...]]) -> StatusMap:
        return cls(MappingProxyType({raw.lower(): s for s, raws in lists.items() for raw in raws}))

    def state_of(self, raw_status: str) -> State:
        return self.states.get(raw_status.lower(), State.UNKNOWN)


@dataclass(frozen=True)
class ApiConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key: Secret | None = None
    timeout: float = 10.0
    max_requests_per_minute: int = 600
    concurrency: int = 8
    format: str = "json"
    # Decoded body size past which a response is refused (invalid_response):
    # a hostile or broken upstream cannot exhaust memory. 1M recipients ≈ 150 MB.
    max_response_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class ScheduleStep:
    """Poll every ``every`` seconds while the message is younger than ``until``."""

    until: float
    every: float


# Tuned with benchmarks/bench_freshness.py: most reports arrive within seconds, some within
# minutes, a few over 48 hours; so poll fast at first and back off steeply (28 polls a life).
DEFAULT_SCHEDULE = (
    ScheduleStep(until=120, every=20),
    ScheduleStep(until=720, every=120),
    ScheduleStep(until=3600, every=480),
    ScheduleStep(until=10800, every=1800),
    ScheduleStep(until=43200, every=10800),
    ScheduleStep(until=172800, every=43200),
)


@dataclass(frozen=True)
class PollingConfig:
    schedule: tuple[ScheduleStep, ...] = DEFAULT_SCHEDULE
    settled_recheck: float = 3600.0
    final_after: float = 172800.0
    retention: float = 604800.0

    def interval(self, age: float) -> float:
        """Seconds between polls for a message ``age`` seconds old."""
        for step in self.schedule:
            if age < step.until:
                return step.every
        return self.schedule[-1].every


@dataclass(frozen=True)
class MessageSpec:
    """A message to track: its upstream ID, extra labels and when it was sent."""

    id: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    sent_at: float | None = None


@dataclass(frozen=True)
class SourceConfig:
    """An enabled source: its name under ``sources:``, its class and its checked settings."""

    name: str
    kind: Any  # a subclass of exporter.sources.Source (not imported: sources import config)
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Config:
    file: str
    api: ApiConfig = ApiConfig()
    polling: PollingConfig = PollingConfig()
    status_map: StatusMap = field(default_factory=StatusMap.default)
    messages: tuple[MessageSpec, ...] = ()
    warnings: tuple[str, ...] = ()
    # Where totals and final snapshots survive restarts; ":memory:" keeps nothing.
    # The file's loader defaults to DEFAULT_STATE_PATH; objects built in code keep nothing.
    state_path: str = ":memory:"
    # This exporter polls only the messages whose ID hashes to shard_index of shard_count
    # (see exporter/shard.py); 1 and 0 poll them all.
    shard_count: int = 1
    shard_index: int = 0
    # Globs of files listing more messages, re-read when they change; relative ones are
    # relative to the config file's folder.
    message_files: tuple[str, ...] = ()
    # The enabled sources in the order configured; None (objects built in code) is the
    # default: bulk_status alone.
    sources: tuple[SourceConfig, ...] | None = None

    @property
    def shard(self) -> Shard:
        return Shard(self.shard_count, self.shard_index)
