"""``bulk_status``: each tracked message's ``GET /v1/bulk-status``, on the age-based schedule.

The messages come from the config's ``messages``, the ``message_files`` (re-read when they
change), registrations over ``POST /api/v1/messages`` and, under ``--demo``, the
simulator's sends; where two name the same ID, that order decides whose labels count.
``smspartner_bulk_status`` is the same against SMS Partner, with its own API section.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import ClassVar

from prometheus_client.core import Metric

from exporter.aggregate import ReportAggregator
from exporter.client import BULK_STATUS, MailPartnerClient, PollError
from exporter.collector import MailPartnerCollector
from exporter.config import ApiConfig, Config, MessageSpec
from exporter.config.holder import ConfigHolder
from exporter.config.options import Options
from exporter.discovery import MessageFiles
from exporter.parse import MAIL, SMS, ReportShape
from exporter.poller import Poller, Upstream
from exporter.sources.base import Poll, Settings, Source, SourceContext
from exporter.state import MEMORY, StateStore, StateStoreError
from exporter.stats import RequestStats
from exporter.tracker import MessageBook, Phase, TrackedMessage

log = logging.getLogger(__name__)
# How often the message files are checked for changes (a stat of each; reads only on change).
FILE_CHECK_INTERVAL = 5.0
# Registrations kept at most: a runaway sender cannot grow the exporter without end.
MAX_REGISTERED = 100_000
# How long a /probe answer is kept: set it to the probe job's scrape interval, and Prometheus
# replicas (which scrape at different offsets) share one request per interval.
PROBE_CACHE = 60.0
SMSPARTNER_BASE_URL = "https://api.smspartner.fr/v1"
SMSPARTNER_KEY_ENV = "SMSPARTNER_API_KEY"


class RegistrationsFull(Exception):
    """``MAX_REGISTERED`` messages are registered already."""


class BulkStatusSource(Source):
    name: ClassVar[str] = "bulk_status"
    prefix: ClassVar[str] = "mailpartner"  # of every series name
    shape: ClassVar[ReportShape] = MAIL

    def __init__(
        self, context: SourceContext, settings: Settings, book: MessageBook | None = None
    ) -> None:
        super().__init__(context, settings)
        self.upstream = self.connect(context, settings)
        self.book = book if book is not None else MessageBook(context.config.polling)
        self._lock = threading.Lock()
        self._registered: dict[str, MessageSpec] = {}
        # When each was registered (since the last start): ends one without sent_at that
        # this shard never tracks.
        self._registered_at: dict[str, float] = {}
        self._extra: dict[str, MessageSpec] = {}  # the demo's sends
        self._changes = 0  # registrations changed: the state needs saving
        self._saved: tuple[int, int] | None = None
        self._store = StateStore(MEMORY if context.demo else context.state_path, source=self.name)
        self._restore()
        self._file_patterns: tuple[str, ...] = ()
        self._files = self._message_files(context, settings)
        self._files_checked = float("-inf")
        if self._files is not None:
            self._files.refresh()
            self._files_checked = context.clock()
        # Mail Partner's API series are the process's (the account source shares them).
        own_api = self.upstream is not context.mailpartner
        self.collector = MailPartnerCollector(
            self.book,
            self.upstream.stats if own_api else None,
            context.holder,
            context.clock,
            prefix=self.prefix,
            api=lambda: self.upstream.api,
            process=False,
        )
        if book is None:  # a book handed in (tests, benchmarks) is tracked as it is
            self.sync(context.clock())

    @classmethod
    def configure(cls, options: Options) -> Settings:
        return {"probe_cache": options.duration("probe_cache", PROBE_CACHE)}

    def connect(self, context: SourceContext, settings: Settings) -> Upstream:
        """The API this source polls: Mail Partner's, shared with the other sources."""
        return context.mailpartner

    def reconnect(self, context: SourceContext, settings: Settings) -> Upstream:
        """The API to poll after a reload (the app reconfigures Mail Partner's itself)."""
        return context.mailpartner

    def configured(self) -> Sequence[MessageSpec]:
        return self.context.config.messages

    # -- which messages ---------------------------------------------------
    def sync(self, now: float) -> None:
        """Track exactly the messages the config, files, registrations and demo name."""
        with self._lock:
            merged: dict[str, MessageSpec] = {}
            files = self._files.messages if self._files else ()
            # First come, first kept: the config, then the files, registrations, demo sends.
            for spec in itertools.chain(
                self.configured(), files, self._registered.values(), self._extra.values()
            ):
                merged.setdefault(spec.id, spec)
            self.book.sync(self.context.config.shard.select(tuple(merged.values())), now)

    def add(self, spec: MessageSpec) -> None:
        """Track ``spec`` until restart (a demo send)."""
        with self._lock:
            self._extra[spec.id] = spec
        self.sync(self.context.clock())

    def register(self, spec: MessageSpec) -> bool:
        """Track ``spec`` from now on, across restarts; False if it was registered as is."""
        with self._lock:
            if spec.id not in self._registered and len(self._registered) >= MAX_REGISTERED:
                raise RegistrationsFull(f"{MAX_REGISTERED} messages are registered already")
            if self._registered.get(spec.id) == spec:
                return False
            self._registered.pop(spec.id, None)  # a changed one moves to the end
            self._registered[spec.id] = spec
            self._registered_at.setdefault(spec.id, self.context.clock())
            self._changes += 1
        self.sync(self.context.clock())
        return True

    def unregister(self, message_id: str) -> bool:
        """Stop tracking a registered message; False if it was not registered."""
        with self._lock:
            if self._registered.pop(message_id, None) is None:
                return False
            self._registered_at.pop(message_id, None)
            self._changes += 1
        self.sync(self.context.clock())
        return True

    def _expire_registrations(self, expired: Sequence[str], now: float) -> None:
        """A registration ends with its message: once it is past retention, or (another
        shard's, never tracked here) once it is older than any message is kept."""
        polling = self.context.config.polling
        horizon = now - polling.final_after - polling.retention
        ended = frozenset(expired)
        with self._lock:
            gone = [
                message_id
                for message_id, spec in self._registered.items()
                if message_id in ended
                or (
                    self.book.get(message_id) is None
                    and (spec.sent_at or self._registered_at.get(message_id, now)) < horizon
                )
            ]
            for message_id in gone:
                del self._registered[message_id]
                self._registered_at.pop(message_id, None)
            if gone:
                self._changes += 1
        if gone:
            self.sync(now)

    def registered(self) -> tuple[MessageSpec, ...]:
        with self._lock:
            return tuple(self._registered.values())

    # -- the Source interface -----------------------------------------------
    def due(self, now: float, limit: int) -> Sequence[Poll]:
        return [_MessagePoll(self, message) for message in self.book.due(now, limit)]

    def requeue(self, polls: Sequence[Poll]) -> None:
        self.book.requeue(p.message for p in polls if isinstance(p, _MessagePoll))

    def next_due(self) -> float | None:
        return self.book.next_poll()

    def everything(self, now: float) -> Sequence[Poll]:
        messages, _ = self.book.snapshot()
        return [_MessagePoll(self, m) for m in messages if m.phase != Phase.FINAL]

    def collect(self) -> Iterable[Metric]:
        yield from self.collector.collect()
        if self._files is not None:
            yield from self._files.collect(self.prefix)

    def tick(self, now: float) -> None:
        expired = self.book.expire(now)
        for message_id in expired:
            log.info("message past retention, no longer exposed", extra={"message_id": message_id})
        self._expire_registrations(expired, now)
        if self._files is not None and now - self._files_checked >= FILE_CHECK_INTERVAL:
            self._files_checked = now
            if self._files.refresh():
                self.sync(now)

    def reconfigure(self, context: SourceContext, settings: Settings) -> bool:
        self.upstream = self.reconnect(context, settings)
        self.context, self.settings = context, settings
        self.book.reconfigure(context.config.polling)
        if self._patterns(context, settings) != self._file_patterns:
            self._files = self._message_files(context, settings)
            self._files_checked = context.clock()
            if self._files is not None:
                self._files.refresh()  # before the sync: file messages must not blink out
        self.sync(context.clock())
        return True

    def save(self, now: float) -> None:
        changes = (self.book.changes, self._changes)
        if changes == self._saved:
            return
        state = dataclasses.replace(self.book.export(now), registered=self.registered())
        try:
            self._store.save(state)
        except StateStoreError as e:
            log.error("cannot save state", extra={"err": str(e)})
        else:
            self._saved = changes

    def close(self) -> None:
        self._store.close()

    # -- polling one message ------------------------------------------------
    def poll(self, message: TrackedMessage) -> None:
        message_id = message.spec.id
        clock = self.context.clock
        try:
            aggregate = self.upstream.client.bulk_status(
                message_id, ReportAggregator(self.context.config.status_map), self.shape
            )
        except PollError as e:
            self.book.record_failure(message_id, str(e), clock())
            level = logging.DEBUG if message.last_error else logging.WARNING
            log.log(level, "poll failed", extra={"message_id": message_id, "err": str(e)})
            raise
        self.book.record_success(message_id, aggregate, clock())
        if message.last_error:
            log.info("poll recovered", extra={"message_id": message_id})

    # -- helpers --------------------------------------------------------------
    def _restore(self) -> None:
        stored = self._store.load()
        if self._store.problem:
            log.warning(self._store.problem)
        if stored is None:
            return
        self.book.restore(stored)
        self._registered = {spec.id: spec for spec in stored.registered}
        self._registered_at = dict.fromkeys(self._registered, self.context.clock())
        self._saved = (self.book.changes, self._changes)
        log.info(
            "state restored",
            extra={
                "source": self.name,
                "path": self._store.path,
                "messages": len(stored.messages),
                "registered": len(stored.registered),
            },
        )

    def _patterns(self, context: SourceContext, settings: Settings) -> tuple[str, ...]:
        return context.config.message_files

    def _message_files(self, context: SourceContext, settings: Settings) -> MessageFiles | None:
        patterns = self._file_patterns = self._patterns(context, settings)
        if not patterns:
            return None
        return MessageFiles(patterns, os.path.dirname(os.path.abspath(context.config.file)))


class SmsPartnerBulkStatusSource(BulkStatusSource):
    """SMS Partner's ``GET /v1/bulk-status``: the same polling, its own API and messages."""

    name: ClassVar[str] = "smspartner_bulk_status"
    prefix: ClassVar[str] = "smspartner"
    shape: ClassVar[ReportShape] = SMS
    key_env: ClassVar[str] = SMSPARTNER_KEY_ENV  # where the key comes from if the file has none

    @classmethod
    def configure(cls, options: Options) -> Settings:
        return {
            "api": options.api(
                "api", ApiConfig(base_url=SMSPARTNER_BASE_URL), SMSPARTNER_KEY_ENV, "SMS Partner"
            ),
            "messages": options.messages("messages"),
            "message_files": options.globs("message_files"),
            **super().configure(options),
        }

    def connect(self, context: SourceContext, settings: Settings) -> Upstream:
        return context.connect(settings["api"], RequestStats([BULK_STATUS]))

    def reconnect(self, context: SourceContext, settings: Settings) -> Upstream:
        if settings["api"] != self.upstream.api:
            fresh = context.connect(settings["api"], self.upstream.stats)
            self.upstream.reconfigure(fresh.api, fresh.client, context.clock())
        return self.upstream

    def configured(self) -> Sequence[MessageSpec]:
        messages: Sequence[MessageSpec] = self.settings["messages"]
        return messages

    def _patterns(self, context: SourceContext, settings: Settings) -> tuple[str, ...]:
        patterns: tuple[str, ...] = settings["message_files"]
        return patterns


class _MessagePoll(Poll):
    def __init__(self, source: BulkStatusSource, message: TrackedMessage) -> None:
        super().__init__(message.next_poll, message.spec.id)
        self.source = source
        self.message = message

    def start(self, now: float) -> bool:
        return self.source.book.start_poll(self.message.spec.id, now)

    def run(self) -> None:
        self.source.poll(self.message)

    def crashed(self, error: Exception) -> None:
        self.source.book.record_failure(
            self.message.spec.id,
            f"internal error: {type(error).__name__}",
            self.source.context.clock(),
        )


def book_poller(
    config: Config,
    book: MessageBook,
    client: MailPartnerClient,
    *,
    clock: Callable[[], float] = time.time,
    executor: Executor | None = None,
) -> Poller:
    """A poller over one bulk_status source polling ``book`` through ``client`` (for tests and
    benchmarks, which drive a book of their own)."""
    upstream = Upstream(config.api, client, client.stats, clock())
    context = SourceContext(
        config,
        ConfigHolder(config, clock()),
        upstream,
        clock,
        connect=lambda api, stats: upstream,
        state_path=":memory:",
    )
    return Poller([BulkStatusSource(context, {}, book=book)], clock=clock, executor=executor)
