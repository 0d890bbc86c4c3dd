"""Which messages are tracked, where each stands in its life, and the running totals.

A message is ``active`` while recipients are pending, ``settled`` once nothing
is pending (one more poll after ``settled_recheck``), and ``final`` after that
recheck or once it is older than ``final_after``. Final messages are never
polled again and are forgotten ``retention`` after they became final.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Callable, Iterable
from typing import NamedTuple

from exporter import schedule
from exporter.aggregate import MessageAggregate
from exporter.config.model import MetricsConfig, PollingConfig
from exporter.domain import MessageSpec
from exporter.queue import TakingTurns, TimeQueue
from exporter.state import StoredMessage, StoredState
from exporter.totals import Totals, TotalsSnapshot
from exporter.tracked import Phase, TrackedMessage, with_series

log = logging.getLogger(__name__)
# How often, at most, final messages without series give up their values (a pass over all).
COMPACT_EVERY = 60.0


class _Gone(NamedTuple):
    """A message that left the config (or, after a restart, was saved but is not named yet)."""

    at: float
    aggregate: MessageAggregate | None  # its last values: one that comes back resumes from them
    final_at: float | None  # it was final: it comes back final
    first_seen: float


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
        self._removed: dict[str, _Gone] = {}
        # When final messages whose series are withheld last gave up their values.
        self._compacted = (-1, float("-inf"))  # (changes, time)
        # Messages saved before a restart, until the config names them again.
        self._stored: dict[str, StoredMessage] = {}
        self.changes = 0  # bumped on every change, so a saver can skip idle periods
        self._totals = Totals(metrics)
        # Next polls: the config's and the files' messages (preferred) take turns with the
        # others, so a backlog of registrations never holds them up.
        self._due = TakingTurns()
        self._preferred: frozenset[str] = frozenset()
        self.not_found = 0  # messages made final as not found, since start
        self.unreported = 0  # messages made final with nothing reported, since start
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

    @property
    def polling(self) -> PollingConfig:
        return self._polling

    def sync(
        self, specs: Iterable[MessageSpec], now: float, preferred: frozenset[str] = frozenset()
    ) -> None:
        """Track exactly ``specs``: add new ones, update changed ones, drop the rest.
        ``preferred`` (the operator's own messages) are polled in turn with all the others."""
        wanted = {spec.id: spec for spec in specs}
        with self._lock:
            self.changes += 1
            self._preferred = preferred
            for message_id in self._messages.keys() - wanted.keys():
                self._drop(message_id, now)
            self._expired = {k: v for k, v in self._expired.items() if k in wanted}
            horizon = now - self._polling.retention  # older removals cannot come back final
            self._removed = {k: v for k, v in self._removed.items() if v.at > horizon}
            for spec in wanted.values():
                self._put(spec, now)

    def add(self, spec: MessageSpec, now: float) -> None:
        """Track ``spec`` too (a registration or a demo send), leaving the others as they are,
        where ``sync`` would go over every message."""
        with self._lock:
            self.changes += 1
            self._put(spec, now)

    def remove(self, message_id: str, now: float) -> None:
        """Stop tracking one message (a registration deleted), leaving the others as they
        are; its last values are kept a while, as ``sync`` keeps them."""
        with self._lock:
            self.changes += 1
            self._expired.pop(message_id, None)
            if message_id in self._messages:
                self._drop(message_id, now)

    def _drop(self, message_id: str, now: float) -> None:
        gone = self._messages.pop(message_id)
        final = gone.phase == Phase.FINAL
        if gone.aggregate is not None or final:
            final_at = gone.final_at if final else None
            self._removed[message_id] = _Gone(now, gone.aggregate, final_at, gone.first_seen)

    def _put(self, spec: MessageSpec, now: float) -> None:
        current = self._messages.get(spec.id)
        if current is not None:
            if current.spec != spec:
                changed = dataclasses.replace(current, spec=spec)
                if spec.scheduled_at != current.spec.scheduled_at and changed.last_poll is None:
                    changed = dataclasses.replace(changed, next_poll=schedule.first_poll(spec, now))
                self._write(changed)
        elif (stored := self._stored.pop(spec.id, None)) is not None:
            # Known from before a restart: its values and phase come back; a final
            # message is not polled again, any other is polled at once.
            self._write(
                TrackedMessage(
                    spec,
                    first_seen=stored.first_seen,
                    next_poll=schedule.first_poll(spec, now),
                    interval=self._polling.schedule[0].every,
                    phase=Phase(stored.phase),
                    aggregate=stored.aggregate,
                    last_success=stored.last_success,
                    poll_ok=stored.last_success is not None,
                    final_at=stored.final_at,
                    first_report=stored.first_report,
                )
            )
        elif (gone := self._removed.pop(spec.id, None)) is not None and gone.final_at:
            # Final before it went away: it comes back final, never polled again.
            self._write(
                TrackedMessage(
                    spec,
                    first_seen=gone.first_seen,
                    next_poll=now,
                    interval=0.0,
                    phase=Phase.FINAL,
                    aggregate=gone.aggregate,
                    final_at=gone.final_at,
                )
            )
        elif spec.id not in self._expired:
            # New messages are due at once: the first poll gives them values; one that went
            # away and came back resumes from its last ones.
            last = gone.aggregate if gone is not None else None
            if gone is None:
                self._totals.seen(spec.labels)
            self._write(
                TrackedMessage(
                    spec,
                    first_seen=now,
                    next_poll=schedule.first_poll(spec, now),
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
                self._queue(message)

    def next_poll(self) -> float | None:
        with self._lock:
            return self._due.first(self._waiting)

    def _queue(self, message: TrackedMessage) -> None:
        message_id = message.spec.id
        self._due.push(message.next_poll, message_id, message_id in self._preferred)

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
            self._queue(message)

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
            spread = (self._jitter() - 0.9) * 5  # 0 to 1 for the jitter's 0.9 to 1.1
            plan = schedule.after_success(current, aggregate, now, self._polling, spread)
            if plan.unreported:
                self.unreported += 1
                log.info("nothing reported for too long: final", extra={"message_id": message_id})
            self._write(
                dataclasses.replace(
                    current,
                    aggregate=aggregate,
                    last_success=now,
                    last_error="",
                    poll_ok=True,
                    failures=0,
                    in_flight=False,
                    phase=plan.phase,
                    next_poll=plan.next_poll,
                    interval=plan.interval,
                    final_at=now if plan.phase == Phase.FINAL else None,
                    first_report=plan.first_report,
                    held_until=plan.held_until,
                    unreported=plan.unreported,
                )
            )

    def record_failure(
        self, message_id: str, error: str, now: float, *, not_found: bool = False
    ) -> None:
        """Keep the last good values and retry (``schedule.after_failure``); ``not_found``:
        the API answered that it does not know the message."""
        with self._lock:
            self.changes += 1
            current = self._messages.get(message_id)
            if current is None:
                return
            plan = schedule.after_failure(current, now, self._polling, self._jitter(), not_found)
            self.not_found += plan.not_found
            self._write(
                dataclasses.replace(
                    current,
                    last_error=error,
                    poll_ok=False,
                    in_flight=False,
                    phase=Phase.FINAL if plan.give_up else current.phase,
                    final_at=now if plan.give_up else None,
                    next_poll=plan.next_poll,
                    interval=plan.interval,
                    failures=current.failures + 1,
                    held_until=None,
                    not_found=plan.not_found,
                )
            )
        if plan.not_found:
            log.info("message not found: final", extra={"message_id": message_id})

    def expire(self, now: float) -> list[str]:
        """Forget final messages whose retention has passed; return their IDs."""
        with self._lock:
            horizon = now - self._polling.retention
            gone = self._finals.pop_due(horizon, len(self._finals), self._final_at)
            self.changes += len(gone)
            for message_id in gone:
                final_at = self._messages.pop(message_id).final_at
                self._expired[message_id] = final_at or now
            changes, at = self._compacted
            if changes != self.changes and now - at >= COMPACT_EVERY:
                self._compact()
                self._compacted = (self.changes, now)
        return gone

    def _compact(self) -> None:
        """Final messages whose per-message series are withheld give up their values: they
        are never polled again and the aggregates have counted them, so memory follows the
        messages still being polled and the ones shown, not the whole retention window."""
        messages = self._messages
        limit = self._metrics.per_message_limit
        if len(messages) <= limit:
            return
        shown = {m.spec.id for m in with_series(tuple(messages.values()), limit)}
        for message_id, message in messages.items():
            if message.phase == Phase.FINAL and message.aggregate and message_id not in shown:
                # Not _write: its expiry is queued already.
                messages[message_id] = dataclasses.replace(message, aggregate=None)

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
                    m.id: _Gone(
                        state.saved_at,
                        m.aggregate,
                        m.final_at if m.phase == Phase.FINAL else None,
                        m.first_seen,
                    )
                    for m in state.messages.values()
                    if m.aggregate is not None or m.phase == Phase.FINAL
                }
            )

    def export(self, now: float) -> StoredState:
        """What a restart needs: every message's values and phase, and the totals."""
        with self._lock:
            messages = {
                m.spec.id: StoredMessage(
                    m.spec.id,
                    m.first_seen,
                    m.phase.value,
                    m.final_at,
                    m.last_success,
                    m.aggregate,
                    m.first_report,
                )
                for m in self._messages.values()
            }
            for message_id, gone in self._removed.items():
                phase = Phase.FINAL if gone.final_at else Phase.ACTIVE
                messages.setdefault(
                    message_id,
                    StoredMessage(
                        message_id,
                        gone.first_seen,
                        phase.value,
                        gone.final_at,
                        None,
                        gone.aggregate,
                    ),
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
