"""The running exporter: the pieces built from one config, and what changes them later
(reload, demo sends, shutdown)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from exporter.client import BULK_STATUS, ME, MailPartnerClient
from exporter.collector import ProcessCollector
from exporter.config.errors import ConfigError, ConfigErrors, SecretError
from exporter.config.holder import ConfigHolder
from exporter.config.loader import API_KEY_ENV, api_keys, load_config, parse_config
from exporter.config.model import ApiConfig, Config, SourceConfig
from exporter.demo import Demo
from exporter.domain import MessageSpec
from exporter.poller import Poller
from exporter.probe import probe_app
from exporter.registration import PATH as MESSAGES_PATH
from exporter.registration import messages_app
from exporter.secret import Redactor, Secret
from exporter.shard import NO_SHARD_FLAGS, ShardFlags
from exporter.sources.base import Source, SourceContext
from exporter.sources.bulk_status import MAIL_PARTNER, BulkStatusSource
from exporter.sources.registry import available
from exporter.stats import RequestStats
from exporter.tracker import MessageBook
from exporter.upstream import Upstream, open_client
from exporter.web import create_app, serve
from exporter.wsgi import StartResponse, respond

DEFAULT_CONFIG = "config.yaml"  # --config.file's default
# What --demo runs on without a config file: the demo's sends, polled, and the account.
DEMO_DEFAULTS = "sources: {bulk_status: {}, account: {every: 5m}}\n"

log = logging.getLogger("exporter")
# How often the main loop saves state and looks for demo sends; signals wake it at once.
_HOUSEKEEPING = 10.0
# On SIGTERM, how long polls in flight may take to finish before their requests are cut off,
# and how long the cut-off polls then take to end: the exit comes within 5 s of the signal.
_DRAIN_TIMEOUT = 2.0
_ABORT_TIMEOUT = 1.0


def load_runnable(
    path: str | None,
    demo: bool,
    shard_flags: ShardFlags = NO_SHARD_FLAGS,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load ``path`` with the installed sources; beyond ``load_config``'s checks, a key is
    needed unless in demo mode. ``--shard.count`` / ``--shard.index``, when given, override
    the file's ``shard`` section. ``path`` None (no ``--config.file``): ``config.yaml``, or,
    in demo mode where there is none, the defaults (the demo's sends, the account's credits).
    """
    if path is None:
        path = DEFAULT_CONFIG
        if demo and not os.path.exists(path):
            variables = os.environ if environ is None else environ
            return parse_config(DEMO_DEFAULTS, path, available(), variables, shard_flags)
    config = load_config(path, available(), environ, shard_flags)
    if not demo:
        missing: list[ConfigError] = [_no_key(config.file)] if config.api.api_key is None else []
        for source in enabled_sources(config):
            api = source.settings.get("api")
            if isinstance(api, ApiConfig) and api.api_key is None:
                env = getattr(source.kind, "key_env", "")
                missing.append(_no_key(config.file, f"sources.{source.name}.api", env))
        if missing:
            raise ConfigErrors(missing)
    return config


def enabled_sources(config: Config) -> tuple[SourceConfig, ...]:
    """The sources to run: as configured, or bulk_status alone for a config built in code."""
    if config.sources is None:
        return (SourceConfig(MAIL_PARTNER.name, MAIL_PARTNER),)
    return config.sources


def owned_messages(config: Config) -> tuple[MessageSpec, ...]:
    """The configured messages this exporter's shard polls (all of them unless sharded)."""
    return config.shard.select(config.messages)


def tracking_fields(config: Config) -> dict[str, object]:
    """Log fields: how many messages are polled here, and the shard when sharded."""
    fields: dict[str, object] = {
        "messages": len(owned_messages(config)),
        "sources": ",".join(source.name for source in enabled_sources(config)),
    }
    if config.shard.sharded:
        fields["shard"] = str(config.shard)
        fields["configured"] = len(config.messages)
    return fields


def _no_key(file: str, key: str = "api", env: str = API_KEY_ENV) -> SecretError:
    return SecretError(
        file,
        key,
        f"no API key: set {key}.api_key_file, {key}.api_key or the {env} environment variable",
    )


class Exporter:
    """Upstreams → sources → poller → collectors, rebuilt in place on reload."""

    def __init__(
        self,
        config: Config,
        path: str | None,
        demo: Demo | None = None,
        *,
        on_secrets: Callable[[Redactor], None] = lambda redactor: None,
        shard_flags: ShardFlags = NO_SHARD_FLAGS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``path``: the file reloads read, as ``load_runnable`` takes it. ``clock`` is the
        wall clock every schedule reads (tests hand in a settable one)."""
        self._clock = clock
        now = clock()
        self._path = path
        self._shard_flags = shard_flags  # kept for reloads: flags beat the file
        self._demo = demo
        self._on_secrets = on_secrets
        self._secrets: list[Secret | None] = []
        self._lock = threading.Lock()  # one reload at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload_requested = False
        config = demo.apply(config) if demo else config
        self.holder = ConfigHolder(config, now)
        self.stats = RequestStats([BULK_STATUS, ME])
        self.mailpartner = Upstream(
            config.api, self._client(config.api, self.stats), self.stats, now
        )
        self.sources = self._sources_for(config, {})
        self._idle_book = MessageBook(config.polling)  # shown when bulk_status is off
        self.poller = Poller(list(self.sources.values()), clock=clock)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_ExporterCollector(self, ProcessCollector(self.stats, self.holder)))

    @property
    def book(self) -> MessageBook:
        """Mail Partner's tracked messages (the status page's table)."""
        source = self.sources.get(MAIL_PARTNER.name)
        return source.book if isinstance(source, BulkStatusSource) else self._idle_book

    def bulk_sources(self) -> dict[str, BulkStatusSource]:
        """The sources that track messages by ID: probes and registrations go to them."""
        return {n: s for n, s in self.sources.items() if isinstance(s, BulkStatusSource)}

    def _sources_for(self, config: Config, running: Mapping[str, Source]) -> dict[str, Source]:
        """The sources ``config`` enables: the ``running`` ones reconfigured in place where
        they take it, the others built. If one cannot start, those built are closed, the
        running ones carry on, and ``ConfigErrors`` names it (in the plugin's own words,
        which the caller scrubs of keys)."""
        context = self._context(config)
        wanted = enabled_sources(config)
        built: dict[str, Source] = {}
        sources: dict[str, Source] = {}
        verb = "start"
        try:
            # New kinds first, so that one failing changes nothing that runs.
            for spec in wanted:
                old = running.get(spec.name)
                if old is None or old.kind != spec.kind:
                    built[spec.name] = spec.kind(context, spec.settings)
            verb = "restart"
            for spec in wanted:
                old = running.get(spec.name)
                if spec.name in built:
                    sources[spec.name] = built[spec.name]
                elif old is not None and old.reconfigure(context, spec.settings):
                    sources[spec.name] = old
                else:
                    sources[spec.name] = built[spec.name] = spec.kind(context, spec.settings)
        except Exception as e:  # a plugin's bug: say which, as for a bad config
            for source in built.values():
                source.close()
            problem = f"cannot {verb}: {type(e).__name__}: {e}"
            raise ConfigErrors([ConfigError(config.file, f"sources.{spec.name}", problem)]) from e
        return sources

    def _context(self, config: Config) -> SourceContext:
        return SourceContext(
            config=config,
            mailpartner=self.mailpartner,
            clock=self._clock,
            connect=self._connect,
            demo=self._demo is not None,
        )

    def _connect(self, api: ApiConfig, stats: RequestStats) -> Upstream:
        return Upstream(api, self._client(api, stats), stats, self._clock())

    def _client(self, api: ApiConfig, stats: RequestStats) -> MailPartnerClient:
        # Every key ever loaded stays scrubbed from the logs, old ones included.
        if api.api_key not in self._secrets:
            self._secrets.append(api.api_key)
            self._on_secrets(Redactor(*self._secrets))
        return open_client(api, stats)

    def reload(self) -> str | None:
        """Load the config file again and swap it in; on any error keep the old one.

        Returns None, or the errors (they name file, key and problem, never the key).
        """
        with self._lock:
            try:
                config = load_runnable(
                    self._path, demo=self._demo is not None, shard_flags=self._shard_flags
                )
            except ConfigErrors as e:
                return self._reload_failed(str(e))
            if self._demo is not None:
                config = self._demo.apply(config)
            now = self._clock()
            try:
                sources = self._sources_for(config, self.sources)
            except ConfigErrors as e:  # a plugin's own words: they may quote a key
                return self._reload_failed(Redactor(*self._secrets, *api_keys(config))(str(e)))
            if config.api != self.holder.config.api:
                client = self._client(config.api, self.stats)
                self.mailpartner.reconfigure(config.api, client, now)
            for name, old in self.sources.items():
                if sources.get(name) is not old:
                    old.save(now)
                    old.close()
            self.sources = sources
            self.poller.reconfigure(list(sources.values()))
            self.holder.swap(config, now)
        log.info("configuration reloaded", extra=tracking_fields(config))
        return None

    def _reload_failed(self, error: str) -> str:
        self.holder.failed()
        log.error("reload failed, keeping the previous configuration", extra={"err": error})
        return error

    def request_reload(self) -> None:
        """Ask the main loop to reload (safe from a signal handler)."""
        self._reload_requested = True
        self._wake.set()

    def request_stop(self) -> None:
        """Ask ``run`` to shut down: polls in flight get a moment to finish (see ``run``)."""
        self._stop.set()
        self._wake.set()
        self.poller.wake()

    def stop_now(self) -> None:
        """Stop without waiting for anything: cut off the requests in flight and save the
        state. For a signal that interrupts start-up, ``--once`` or a shutdown under way."""
        self.request_stop()
        self.abort()
        self.save()

    def serve(
        self,
        address: str,
        telemetry_path: str,
        web_config_path: str | None = None,
        *,
        lifecycle: bool = False,
        registration: bool = False,
    ) -> WSGIServer:
        """Serve the routes on ``address``. The write endpoints are off unless asked for, as
        in Prometheus: ``POST /-/reload`` with ``lifecycle``, ``POST``/``DELETE
        /api/v1/messages`` with ``registration``."""
        more = {
            "/probe": probe_app(self.bulk_sources),
            MESSAGES_PATH: messages_app(
                self.bulk_sources,
                changed=self._registered,
                writable=registration,
                # The shard, and where the others are, as the config in force says.
                shard=lambda: self.holder.config.shard,
            ),
        }
        if not lifecycle:
            more["/-/reload"] = _lifecycle_disabled
        app = create_app(
            self.registry,
            lambda: self.book,  # a reload may switch bulk_status off or on
            telemetry_path=telemetry_path,
            reload=self.reload if lifecycle else None,
            clock=self._clock,
            more=more,
        )
        return serve(app, address, web_config_path)

    def _registered(self) -> None:
        """A registration came or went (and is on disk already): the poll loop polls a new
        message now rather than at its next idle wake-up."""
        self.poller.wake()

    def run(self, server: WSGIServer) -> int:
        """Poll and serve until ``request_stop``; then let polls in flight finish, for a
        moment: a trickling upstream must not hold the exit (the pool's threads are joined).
        The command line runs it in a thread of its own, and keeps the main thread for
        signals (``exporter.cli.StopSignals``)."""
        poller = threading.Thread(
            target=self.poller.run, args=(self._stop,), name="poller", daemon=True
        )
        poller.start()
        while not self._stop.is_set():
            self._wake.wait(_HOUSEKEEPING)
            self._wake.clear()
            self.save()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            if self._demo is not None:
                source = self.sources.get(MAIL_PARTNER.name)
                for spec in self._demo.new_messages():
                    if isinstance(source, BulkStatusSource):
                        source.add(spec)
                        log.info("demo send", extra={"message_id": spec.id})
                self.poller.wake()
        if not self.poller.drain(_DRAIN_TIMEOUT):
            log.info("cutting off the requests still in flight")
        self.abort()
        if not self.poller.drain(_ABORT_TIMEOUT):
            log.warning("polls still in flight at shutdown were abandoned")
        self.save()
        for source in self.sources.values():
            source.close()
        server.shutdown()
        server.server_close()
        return 0

    def abort(self) -> None:
        """Cut off every request in flight, probes' too, and start no new one (shutdown)."""
        for upstream in {self.mailpartner, *(s.upstream for s in self.sources.values())}:
            upstream.abort()

    def save(self) -> None:
        """Write each source's state if anything changed; a failure is logged, never raised."""
        now = self._clock()
        for source in self.sources.values():
            source.save(now)


def _lifecycle_disabled(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """``/-/reload`` without ``--web.enable-lifecycle``: Prometheus's answer, and the flag."""
    return respond(
        start_response,
        "403 Forbidden",
        "Lifecycle API is not enabled: start with --web.enable-lifecycle (SIGHUP reloads)\n",
    )


class _ExporterCollector(Collector):
    """Every enabled source's series as the sources are at each scrape, then the process's.

    A family whose name was already yielded (a plugin reusing a built-in's name) is dropped
    with a warning: a duplicate would make Prometheus refuse the whole scrape.
    """

    def __init__(self, exporter: Exporter, process: Collector) -> None:
        self._exporter = exporter
        self._process = process
        self._warned: set[tuple[str, str]] = set()

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set()
        for source in list(self._exporter.sources.values()):
            try:
                yield from self._unique(source.name, source.collect(), seen)
            except Exception:  # one plugin's bug must not fail the scrape
                log.exception("a source failed to collect", extra={"source": source.name})
        yield from self._unique("process", self._process.collect(), seen)

    def _unique(self, owner: str, metrics: Iterable[Metric], seen: set[str]) -> Iterator[Metric]:
        for metric in metrics:
            if metric.name not in seen:
                seen.add(metric.name)
                yield metric
            elif (owner, metric.name) not in self._warned:
                self._warned.add((owner, metric.name))
                log.warning(
                    "a source's series repeat a name already exposed; dropped",
                    extra={"source": owner, "metric": metric.name},
                )
