"""Which messages are tracked, where each stands in its life, and the running totals.

A message is ``active`` while recipients are pending, ``settled`` once nothing
is pending (one more poll after ``settled_recheck``), and ``final`` after that
recheck or once it is older than ``final_after``. Final messages are never
polled again and are forgotten ``retention`` after they became final.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import logging
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from exporter.aggregate import MessageAggregate
from exporter.config.model import MetricsConfig, PollingConfig
from exporter.domain import MessageSpec
from exporter.queue import TimeQueue
from exporter.state import StoredMessage, StoredState
from exporter.totals import Totals, TotalsSnapshot

log = logging.getLogger(__name__)
# First retry of a failed poll; each further failure doubles it, up to the interval.
RETRY_AFTER = 10.0


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

    @property
    def sent_at(self) -> float:
        return self.spec.sent_at if self.spec.sent_at is not None else self.first_seen


class MessageBook:
    """Thread-safe registry of tracked messages; the poller and scrapes share it."""

    def __init__(
        self,
        polling: PollingConfig,
        jitter: Callable[[], float] | None = None,
        metrics: MetricsConfig = MetricsConfig(),  # noqa: B008 - frozen
    ) -> None:
        self._polling = polling
        self._metrics = metrics
        # Spreads retries of messages that failed together; tests pass a constant.
        self._jitter = jitter or (lambda: random.uniform(0.9, 1.1))  # noqa: S311 - not secret
        self._lock = threading.Lock()
        self._messages: dict[str, TrackedMessage] = {}
        # Messages past retention that the config still names, by when they became final.
        self._expired: dict[str, float] = {}
        # Last values of messages dropped from the config, so one that comes back
        # resumes from them instead of adding its counts to the totals again.
        self._removed: dict[str, tuple[float, MessageAggregate]] = {}
        # Messages saved before a restart, until the config names them again.
        self._stored: dict[str, StoredMessage] = {}
        self.changes = 0  # bumped on every change, so a saver can skip idle periods
        self._totals = Totals(metrics)
        self._due = TimeQueue()  # next polls
        self._finals = TimeQueue()  # when final messages became final, for retention

    def reconfigure(self, polling: PollingConfig, metrics: MetricsConfig | None = None) -> None:
        """Use ``polling`` from each message's next poll on, and count by ``metrics``."""
        with self._lock:
            self._polling = polling
            if metrics is not None:
                self._metrics = metrics
                self._totals.reconfigure(metrics)

    @property
    def metrics(self) -> MetricsConfig:
        return self._metrics

    def sync(self, specs: Iterable[MessageSpec], now: float) -> None:
        """Track exactly ``specs``: add new ones, update changed ones, drop the rest."""
        wanted = {spec.id: spec for spec in specs}
        with self._lock:
            self.changes += 1
            for message_id in self._messages.keys() - wanted.keys():
                gone = self._messages.pop(message_id)
                if gone.aggregate is not None:
                    self._removed[message_id] = (now, gone.aggregate)
            self._expired = {k: v for k, v in self._expired.items() if k in wanted}
            horizon = now - self._polling.retention  # older removals cannot come back final
            self._removed = {k: v for k, v in self._removed.items() if v[0] > horizon}
            for spec in wanted.values():
                self._put(spec, now)

    def add(self, spec: MessageSpec, now: float) -> None:
        """Track ``spec`` too (a registration or a demo send), leaving the others as they are,
        where ``sync`` would go over every message."""
        with self._lock:
            self.changes += 1
            self._put(spec, now)

    def _put(self, spec: MessageSpec, now: float) -> None:
        current = self._messages.get(spec.id)
        if current is not None:
            if current.spec != spec:
                self._write(dataclasses.replace(current, spec=spec))
        elif (stored := self._stored.pop(spec.id, None)) is not None:
            # Known from before a restart: its values and phase come back; a final
            # message is not polled again, any other is polled at once.
            self._write(
                TrackedMessage(
                    spec,
                    first_seen=stored.first_seen,
                    next_poll=now,
                    interval=self._polling.schedule[0].every,
                    phase=Phase(stored.phase),
                    aggregate=stored.aggregate,
                    last_success=stored.last_success,
                    poll_ok=stored.last_success is not None,
                    final_at=stored.final_at,
                )
            )
        elif spec.id not in self._expired:
            # New messages are due at once: the first poll gives them values.
            _, last = self._removed.pop(spec.id, (now, None))
            if last is None:  # not one that went away and came back
                self._totals.seen(spec.labels)
            self._write(
                TrackedMessage(
                    spec,
                    first_seen=now,
                    next_poll=now,
                    interval=self._polling.schedule[0].every,
                    aggregate=last,
                )
            )

    def get(self, message_id: str) -> TrackedMessage | None:
        with self._lock:
            return self._messages.get(message_id)

    def due(self, now: float, limit: int) -> list[TrackedMessage]:
        """Up to ``limit`` messages to poll now, most overdue first."""
        with self._lock:
            ids = self._due.pop_due(now, limit, self._waiting)
            return [self._messages[message_id] for message_id in ids]

    def requeue(self, messages: Iterable[TrackedMessage]) -> None:
        """Put back messages ``due`` handed out that could not be started after all."""
        with self._lock:
            for message in messages:
                self._due.push(message.next_poll, message.spec.id)

    def next_poll(self) -> float | None:
        with self._lock:
            return self._due.first(self._waiting)

    def _waiting(self, message_id: str, when: float) -> bool:
        """Is ``message_id`` waiting for a poll at ``when``? (a due-queue entry still valid)"""
        message = self._messages.get(message_id)
        return (
            message is not None
            and message.next_poll == when
            and not message.in_flight
            and message.phase != Phase.FINAL
        )

    def _write(self, message: TrackedMessage) -> None:
        """Store ``message``, queueing its next poll or its expiry."""
        self._messages[message.spec.id] = message
        if message.phase == Phase.FINAL:
            if message.final_at is not None:
                self._finals.push(message.final_at, message.spec.id)
        elif not message.in_flight:
            self._due.push(message.next_poll, message.spec.id)

    def start_poll(self, message_id: str, now: float) -> bool:
        """Mark a poll in flight; False if the message went away meanwhile."""
        with self._lock:
            current = self._messages.get(message_id)
            if current is None or current.in_flight:
                return False
            self._write(dataclasses.replace(current, in_flight=True, last_poll=now))
            return True

    def record_success(self, message_id: str, aggregate: MessageAggregate, now: float) -> None:
        with self._lock:
            self.changes += 1
            current = self._messages.get(message_id)
            if current is None:
                return
            self._totals.grow(current.spec.labels, current.aggregate, aggregate)
            if aggregate.skewed and not (current.aggregate and current.aggregate.skewed):
                log.warning(
                    "reports dated before the send: counted as delivered at once",
                    extra={"message_id": message_id, "recipients": aggregate.skewed},
                )
            phase, next_poll, interval = self._next(current, aggregate, now)
            self._write(
                dataclasses.replace(
                    current,
                    aggregate=aggregate,
                    last_success=now,
                    last_error="",
                    poll_ok=True,
                    failures=0,
                    in_flight=False,
                    phase=phase,
                    next_poll=next_poll,
                    interval=interval,
                    final_at=now if phase == Phase.FINAL else None,
                )
            )

    def record_failure(self, message_id: str, error: str, now: float) -> None:
        """Keep the last good values; retry with exponential backoff and jitter, from
        ``RETRY_AFTER`` up to the schedule's interval for the message's age.

        Past ``final_after`` (or past first sight, for a message first seen later)
        a failing message is retried for ``settled_recheck``, then given up as
        final with the values it has.
        """
        with self._lock:
            self.changes += 1
            current = self._messages.get(message_id)
            if current is None:
                return
            polling = self._polling
            final_at = current.sent_at + polling.final_after
            interval = self._interval(current, now)
            failures = current.failures + 1
            retry = min(interval, RETRY_AFTER * 2 ** min(failures - 1, 16)) * self._jitter()
            give_up = now >= max(final_at, current.first_seen) + polling.settled_recheck
            self._write(
                dataclasses.replace(
                    current,
                    last_error=error,
                    poll_ok=False,
                    in_flight=False,
                    phase=Phase.FINAL if give_up else current.phase,
                    final_at=now if give_up else None,
                    next_poll=now + retry if now >= final_at else min(now + retry, final_at),
                    interval=0.0 if give_up else interval,
                    failures=failures,
                )
            )

    def expire(self, now: float) -> list[str]:
        """Forget final messages whose retention has passed; return their IDs."""
        with self._lock:
            horizon = now - self._polling.retention
            gone = self._finals.pop_due(horizon, len(self._finals), self._final_at)
            self.changes += len(gone)
            for message_id in gone:
                final_at = self._messages.pop(message_id).final_at
                self._expired[message_id] = final_at or now
        return gone

    def _final_at(self, message_id: str, when: float) -> bool:
        message = self._messages.get(message_id)
        return message is not None and message.phase == Phase.FINAL and message.final_at == when

    def restore(self, state: StoredState) -> None:
        """Take back what a previous run saved; call before the first ``sync``."""
        with self._lock:
            self._totals.restore(state.totals)
            self._stored = dict(state.messages)
            # Saved messages the config no longer names still must not count twice.
            self._removed.update(
                {
                    m.id: (state.saved_at, m.aggregate)
                    for m in state.messages.values()
                    if m.aggregate is not None
                }
            )

    def export(self, now: float) -> StoredState:
        """What a restart needs: every message's values and phase, and the totals."""
        with self._lock:
            messages = {
                m.spec.id: StoredMessage(
                    m.spec.id, m.first_seen, m.phase.value, m.final_at, m.last_success, m.aggregate
                )
                for m in self._messages.values()
            }
            for message_id, (_, aggregate) in self._removed.items():
                messages.setdefault(
                    message_id,
                    StoredMessage(message_id, now, Phase.ACTIVE.value, None, None, aggregate),
                )
            # Expired ones come back final and past retention: gone again, never re-polled.
            for message_id, final_at in self._expired.items():
                messages.setdefault(
                    message_id,
                    StoredMessage(message_id, final_at, Phase.FINAL.value, final_at, None, None),
                )
            return StoredState(messages, self._totals.snapshot(), now)

    def snapshot(self) -> tuple[tuple[TrackedMessage, ...], TotalsSnapshot]:
        with self._lock:
            return tuple(self._messages.values()), self._totals.snapshot()

    # -- schedule ------------------------------------------------------------
    def _interval(self, message: TrackedMessage, now: float) -> float:
        return self._polling.interval(max(0.0, now - message.sent_at))

    def _next(
        self, message: TrackedMessage, aggregate: MessageAggregate, now: float
    ) -> tuple[Phase, float, float]:
        polling = self._polling
        final_at = message.sent_at + polling.final_after
        if now >= final_at:
            return Phase.FINAL, now, 0.0
        if aggregate.pending or not aggregate.recipients:
            interval = self._interval(message, now)
            return Phase.ACTIVE, min(now + interval, final_at), interval
        if message.phase == Phase.SETTLED:  # this was the recheck, and still nothing pending
            return Phase.FINAL, now, 0.0
        return (
            Phase.SETTLED,
            min(now + polling.settled_recheck, final_at),
            polling.settled_recheck,
        )


def with_series(messages: Sequence[TrackedMessage], limit: int) -> Sequence[TrackedMessage]:
    """The messages that get per-message series (``metrics.per_message_limit``): unfinished
    ones first, then the newest sent."""
    if len(messages) <= limit:
        return messages
    return heapq.nsmallest(limit, messages, key=_series_order)


def _series_order(message: TrackedMessage) -> tuple[bool, float, str]:
    return message.phase == Phase.FINAL, -message.sent_at, message.spec.id
