"""The configuration as frozen, typed objects (see SPEC §4)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from exporter.domain import MessageSpec, StatusMap
from exporter.secret import Secret
from exporter.shard import Shard

if TYPE_CHECKING:
    from exporter.config.options import Options

DEFAULT_BASE_URL = "https://api.mailpartner.fr/v1"
DEFAULT_STATE_PATH = "mailpartner-exporter.db"


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
    # While nothing of a message is reported (held, deferred): at most this far apart, and
    # final after ``unreported_max`` of that (exporter.schedule).
    unreported_every: float = 600.0
    unreported_max: float = 604800.0
    # Mail Partner holds commercial email outside working hours (exporter.calendar); False for
    # an account whose restriction is lifted.
    quiet_hours: bool = True
    # Label values that mark a message transactional (never held), as (name, values) pairs:
    # (("campaign", frozenset({"invoice", "password-reset"})),).
    transactional_labels: tuple[tuple[str, frozenset[str]], ...] = ()

    def transactional(self, spec: MessageSpec) -> bool:
        """Does ``spec`` go out whatever the hour (or is the account never held)?"""
        if spec.transactional or not self.quiet_hours:
            return True
        return any(spec.labels.get(name) in values for name, values in self.transactional_labels)

    def interval(self, age: float) -> float:
        """Seconds between polls for a message ``age`` seconds old."""
        for step in self.schedule:
            if age < step.until:
                return step.every
        return self.schedule[-1].every


# Seconds from send to delivery: a transactional stream's SLO sits at the low end, a campaign
# held through the night at the high end (48 h: reports stop changing).
DEFAULT_DELAY_BUCKETS = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
    86400.0, 172800.0,
)  # fmt: skip


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics``: what the aggregate series carry, and how many per-message series there are."""

    # Message labels the aggregate series carry (a message without one has it empty).
    aggregate_by: tuple[str, ...] = ("campaign",)
    # Distinct label sets kept; more fold into one whose labels are all "__other__".
    max_aggregate_label_sets: int = 500
    # Messages with per-message series: unfinished first, then the newest sent.
    per_message_limit: int = 1000
    delivery_delay_buckets: tuple[float, ...] = DEFAULT_DELAY_BUCKETS


class SourceKind(Protocol):
    """What the loader needs of a kind of source: how to read its section under ``sources:``.

    The kinds (``exporter.sources``: a ``Source`` class, or a bulk-status API described as
    data) are handed to the loader by its caller; config knows nothing of what they poll.
    """

    def configure(self, options: Options, /) -> Mapping[str, Any]: ...

    # Builds the source (an exporter.sources.Source) from its context and settings.
    def __call__(self, context: Any, settings: Mapping[str, Any], /) -> Any: ...


@dataclass(frozen=True)
class SourceConfig:
    """An enabled source: its name under ``sources:``, its kind and its checked settings."""

    name: str
    kind: SourceKind
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
    metrics: MetricsConfig = MetricsConfig()
    # Where each shard serves, ``{index}`` for its number: a registration for a message of
    # another shard is sent on there (exporter.forward); None answers 421 instead.
    shard_peer_url: str | None = None

    @property
    def shard(self) -> Shard:
        return Shard(self.shard_count, self.shard_index, self.shard_peer_url)
