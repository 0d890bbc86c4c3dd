"""Saving a source's state, and saying so when it cannot: a failure count for the metric and
the alert, a log line at most once a minute (a full disk must not write one per
registration), and whether a registration made now would survive a restart."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

from exporter.config.errors import ConfigErrors
from exporter.config.reader import parse_message
from exporter.domain import MessageSpec
from exporter.state import MEMORY, StateStore, StateStoreError, StoredState

log = logging.getLogger(__name__)
# At most one "cannot save state" line this often, with the failures since the last one.
LOG_EVERY = 60.0


class Saver:
    """``store`` as a source writes it: every write through here is counted if it fails."""

    def __init__(self, store: StateStore, clock: Callable[[], float]) -> None:
        self.store = store
        self.failures = 0  # since start: mailpartner_exporter_state_save_failures_total
        self._clock = clock
        self._lock = threading.Lock()
        self._error: str | None = None  # of the last write, None once one succeeds
        self._logged = float("-inf")
        self._unlogged = 0

    def save(self, state: StoredState) -> bool:
        """Replace the stored state; False (counted, logged now and then) if it failed."""
        return self._write(lambda: self.store.save(state))

    def save_registrations(self, changes: Mapping[str, MessageSpec | None]) -> bool:
        return self._write(lambda: self.store.save_registrations(changes))

    @property
    def volatile(self) -> str | None:
        """Why what is registered now would not survive a restart; None if it would."""
        if self.store.path == MEMORY:
            return 'state.path is ":memory:"'
        if not self.store.writable:
            return self.store.problem or "the state file cannot be written"
        return self._error

    def _write(self, write: Callable[[], None]) -> bool:
        try:
            write()
        except StateStoreError as e:
            self._failed(str(e))
            return False
        with self._lock:
            recovered, self._error, self._unlogged = self._error is not None, None, 0
        if recovered:
            log.info("state saved again", extra={"path": self.store.path})
        return True

    def _failed(self, error: str) -> None:
        now = self._clock()
        with self._lock:
            self.failures += 1
            self._unlogged += 1
            self._error = error
            if now - self._logged < LOG_EVERY:
                return
            self._logged, failures, self._unlogged = now, self._unlogged, 0
        log.error("cannot save state", extra={"err": error, "failures": failures})


def still_valid(registered: Iterable[MessageSpec], source: str) -> Iterator[MessageSpec]:
    """The registrations of a state file that today's checks allow: one saved before a limit
    existed (a 60 KB label value, a time in year 9999) is dropped, with a log line naming it."""
    for spec in registered:
        document: dict[str, object] = {"id": spec.id, "labels": dict(spec.labels)}
        if spec.sent_at is not None:
            document["sent_at"] = spec.sent_at
        if spec.scheduled_at is not None:
            document["scheduled_at"] = spec.scheduled_at
        if spec.transactional:
            document["transactional"] = True
        try:
            parse_message(document, "state file registration")
        except ConfigErrors as e:
            log.warning(
                "registration in the state file dropped",
                extra={"source": source, "message_id": spec.id[:128], "err": str(e)[:500]},
            )
        else:
            yield spec
