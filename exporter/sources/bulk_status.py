"""``bulk_status``: each tracked message's ``GET /v1/bulk-status``, on the age-based schedule.

The messages come from the config's ``messages``, the ``message_files`` (re-read when they
change), registrations over ``POST /api/v1/messages`` and, under ``--demo``, the
simulator's sends; where two name the same ID, that order decides whose labels count.
``smspartner_bulk_status`` is the same source handed SMS Partner's values (``SMS_PARTNER``):
its report shape, metric prefix, and an API section and messages of its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

from exporter.aggregate import ReportAggregator
from exporter.client import BULK_STATUS, PollError
from exporter.collector import MailPartnerCollector
from exporter.config.model import ApiConfig
from exporter.config.options import Options
from exporter.discovery import MessageFiles
from exporter.domain import MessageSpec
from exporter.parse import MAIL, SMS, ReportShape
from exporter.sources.base import Poll, Settings, Source, SourceContext
from exporter.sources.saving import Saver, still_valid
from exporter.state import StateStore
from exporter.stats import RequestStats
from exporter.tracked import Phase, TrackedMessage
from exporter.tracker import MessageBook
from exporter.upstream import Upstream

log = logging.getLogger(__name__)
# How often the message files are checked for changes (a stat of each; reads only on change).
FILE_CHECK_INTERVAL = 5.0
# Registrations kept at most: a runaway sender cannot grow the exporter without end.
MAX_REGISTERED = 100_000
# How often registrations that this shard never tracks are checked for their end.
REGISTRATION_SWEEP = 60.0
# How long a /probe answer is kept: set it to the probe job's scrape interval, and Prometheus
# replicas (which scrape at different offsets) share one request per interval.
PROBE_CACHE = 60.0
SMSPARTNER_BASE_URL = "https://api.smspartner.fr/v1"
SMSPARTNER_KEY_ENV = "SMSPARTNER_API_KEY"


class RegistrationsFull(Exception):
    """``MAX_REGISTERED`` messages are registered already."""


@dataclass(frozen=True)
class BulkStatusKind:
    """A bulk-status API as a kind of source: all that tells SMS Partner from Mail Partner.

    With ``own_api`` None the source polls Mail Partner's top-level ``api`` (shared with the
    other sources) for the config's ``messages`` and ``message_files``; otherwise its section
    holds an ``api`` of its own (these defaults, the key from ``key_env`` if the file has
    none) beside its own ``messages`` and ``message_files``.
    """

    name: str  # its key under ``sources:``
    prefix: str  # of every series name
    shape: ReportShape
    own_api: ApiConfig | None = None
    key_env: str = ""
    upstream: str = "Mail Partner"  # the API's name, in messages

    def configure(self, options: Options) -> Settings:
        settings: dict[str, Any] = {}
        if self.own_api is not None:
            settings["api"] = options.api("api", self.own_api, self.key_env, self.upstream)
            settings["messages"] = options.messages("messages")
            settings["message_files"] = options.globs("message_files")
        settings["probe_cache"] = options.duration("probe_cache", PROBE_CACHE)
        return settings

    def __call__(self, context: SourceContext, settings: Settings) -> BulkStatusSource:
        return BulkStatusSource(context, settings, self)


MAIL_PARTNER = BulkStatusKind("bulk_status", "mailpartner", MAIL)
SMS_PARTNER = BulkStatusKind(
    "smspartner_bulk_status",
    "smspartner",
    SMS,
    own_api=ApiConfig(base_url=SMSPARTNER_BASE_URL),
    key_env=SMSPARTNER_KEY_ENV,
    upstream="SMS Partner",
)


class BulkStatusSource(Source):
    """The messages one bulk-status API is polled for, and their series."""

    def __init__(
        self, context: SourceContext, settings: Settings, kind: BulkStatusKind = MAIL_PARTNER
    ) -> None:
        super().__init__(context, settings)
        self._kind = kind
        self.name = kind.name
        self.upstream = _connect(context, settings, None)
        self.book = MessageBook(context.config.polling, context.jitter, context.config.metrics)
        self._lock = threading.Lock()
        # IDs the config or the files name: registrations and demo sends do not override them.
        self._claimed: frozenset[str] = frozenset()
        self._registered: dict[str, MessageSpec] = {}
        # When each was registered (since the last start): ends one without sent_at that
        # this shard never tracks.
        self._registered_at: dict[str, float] = {}
        self._extra: dict[str, MessageSpec] = {}  # the demo's sends
        self._swept = float("-inf")
        self._changes = 0  # registrations changed: the state needs saving
        self._saved: tuple[int, int] | None = None
        # Registrations changed since the last save (None: deleted), written at once.
        self._unsaved: dict[str, MessageSpec | None] = {}
        self._saver = Saver(StateStore(context.state_path, source=self.name), context.clock)
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
            lambda: self.upstream.api,
            context.clock,
            prefix=kind.prefix,
        )
        self.sync(context.clock())

    @property
    def kind(self) -> BulkStatusKind:
        return self._kind

    @property
    def prefix(self) -> str:
        return self._kind.prefix

    @property
    def shape(self) -> ReportShape:
        return self._kind.shape

    # -- which messages ---------------------------------------------------
    def sync(self, now: float) -> None:
        """Track exactly the messages the config, files, registrations and demo name."""
        with self._lock:
            merged: dict[str, MessageSpec] = {}
            files = self._files.messages if self._files else ()
            # First come, first kept: the config, then the files, registrations, demo sends.
            for spec in itertools.chain(self._configured(), files):
                merged.setdefault(spec.id, spec)
            self._claimed = frozenset(merged)
            for spec in itertools.chain(self._registered.values(), self._extra.values()):
                merged.setdefault(spec.id, spec)
            owned = self.context.config.shard.select(tuple(merged.values()))
            self.book.sync(owned, now, preferred=self._claimed)

    def _track(self, spec: MessageSpec) -> None:
        """Track one new registration or demo send, without going over every message again
        as ``sync`` does (a registration a second must not cost a pass over 100,000)."""
        if spec.id not in self._claimed and self.context.config.shard.owns(spec.id):
            self.book.add(spec, self.context.clock())

    def add(self, spec: MessageSpec) -> None:
        """Track ``spec`` until restart (a demo send)."""
        with self._lock:
            self._extra[spec.id] = spec
            if spec.id not in self._registered:
                self._track(spec)

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
            self._unsaved[spec.id] = spec
            self._track(spec)
        self.save_registrations()
        return True

    def unregister(self, message_id: str) -> bool:
        """Stop tracking a registered message; False if it was not registered."""
        with self._lock:
            if self._registered.pop(message_id, None) is None:
                return False
            self._registered_at.pop(message_id, None)
            self._changes += 1
            self._unsaved[message_id] = None
            # The config's or the files' own message goes on being tracked; a demo send's
            # goes back to its own labels.
            if message_id in self._extra:
                self._track(self._extra[message_id])
            elif message_id not in self._claimed:
                self.book.remove(message_id, self.context.clock())
        self.save_registrations()
        return True

    def save_registrations(self) -> None:
        """Write the registrations changed since the last save, and only those: one is on
        disk when its answer leaves, without rewriting every message (``save`` does that)."""
        with self._lock:
            changes, self._unsaved = self._unsaved, {}
        if changes and not self._saver.save_registrations(changes):
            with self._lock:  # the next full save writes them; newer changes win
                self._unsaved = {**changes, **self._unsaved}

    @property
    def volatile(self) -> str | None:
        """Why a registration made now would not survive a restart; None if it would."""
        return self._saver.volatile

    def _expire_registrations(self, expired: Sequence[str], now: float) -> None:
        """A registration ends with its message: once it is past retention, or (another
        shard's, never tracked here) once it is older than any message is kept. That second
        case looks at every registration: once a minute, not on every turn of the poll loop."""
        polling = self.context.config.polling
        horizon = now - polling.final_after - polling.retention
        with self._lock:
            gone = [message_id for message_id in expired if message_id in self._registered]
            if now - self._swept >= REGISTRATION_SWEEP:
                self._swept = now
                gone += [
                    message_id
                    for message_id, spec in self._registered.items()
                    if self.book.get(message_id) is None
                    and (spec.sent_at or self._registered_at.get(message_id, now)) < horizon
                ]
            for message_id in gone:
                self._registered.pop(message_id, None)
                self._registered_at.pop(message_id, None)
                self._unsaved[message_id] = None
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
        yield CounterMetricFamily(
            f"{self.prefix}_exporter_state_save_failures",
            "Writes of the state file that failed (the last saved state stays on disk).",
            value=self._saver.failures,
        )
        yield CounterMetricFamily(
            f"{self.prefix}_exporter_messages_not_found",
            "Messages made final because the API still did not know them 15 minutes after"
            " they were sent.",
            value=self.book.not_found,
        )
        yield CounterMetricFamily(
            f"{self.prefix}_exporter_messages_unreported",
            "Messages made final with nothing reported after polling.unreported_max.",
            value=self.book.unreported,
        )
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
        self.upstream = _connect(context, settings, self.upstream)
        self.context, self.settings = context, settings
        self.book.reconfigure(context.config.polling, context.config.metrics)
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
        with self._lock:
            registered, self._unsaved = tuple(self._registered.values()), {}
        if self._saver.save(dataclasses.replace(self.book.export(now), registered=registered)):
            self._saved = changes

    def close(self) -> None:
        self._saver.store.close()

    # -- polling one message ------------------------------------------------
    def poll(self, message: TrackedMessage) -> None:
        message_id = message.spec.id
        clock = self.context.clock
        try:
            config = self.context.config
            aggregator = ReportAggregator(
                config.status_map,
                sent_at=message.start,
                delay_buckets=config.metrics.delivery_delay_buckets,
            )
            aggregate = self.upstream.client.bulk_status(message_id, aggregator, self.kind.shape)
        except PollError as e:
            self.book.record_failure(message_id, str(e), clock(), not_found=e.label == "4")
            level = logging.DEBUG if message.last_error else logging.WARNING
            log.log(level, "poll failed", extra={"message_id": message_id, "err": str(e)})
            raise
        self.book.record_success(message_id, aggregate, clock())
        if message.last_error:
            log.info("poll recovered", extra={"message_id": message_id})

    # -- helpers --------------------------------------------------------------
    def _restore(self) -> None:
        store = self._saver.store
        stored = store.load()
        if store.problem:
            log.warning(store.problem)
        if stored is None:
            return
        self.book.restore(stored)
        self._registered = {spec.id: spec for spec in still_valid(stored.registered, self.name)}
        self._registered_at = dict.fromkeys(self._registered, self.context.clock())
        self._saved = (self.book.changes, self._changes)
        log.info(
            "state restored",
            extra={
                "source": self.name,
                "path": store.path,
                "messages": len(stored.messages),
                "registered": len(stored.registered),
            },
        )

    def _configured(self) -> Sequence[MessageSpec]:
        messages: Sequence[MessageSpec] = self.settings.get(
            "messages", self.context.config.messages
        )
        return messages

    def _patterns(self, context: SourceContext, settings: Settings) -> tuple[str, ...]:
        patterns: tuple[str, ...] = settings.get("message_files", context.config.message_files)
        return patterns

    def _message_files(self, context: SourceContext, settings: Settings) -> MessageFiles | None:
        patterns = self._file_patterns = self._patterns(context, settings)
        if not patterns:
            return None
        return MessageFiles(patterns, os.path.dirname(os.path.abspath(context.config.file)))


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


def _connect(context: SourceContext, settings: Settings, current: Upstream | None) -> Upstream:
    """The API to poll: Mail Partner's, shared with the other sources (the app reconfigures
    it on reload), or the source's own ``api``, whose budget and counts outlive a reload."""
    api: ApiConfig | None = settings.get("api")
    if api is None:
        return context.mailpartner
    if current is None or current is context.mailpartner:
        return context.connect(api, RequestStats([BULK_STATUS]))
    if api != current.api:
        fresh = context.connect(api, current.stats)
        current.reconfigure(fresh.api, fresh.client, context.clock())
    return current
