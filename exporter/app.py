"""The running exporter: the pieces built from one config, and what changes them later
(reload, demo sends, shutdown)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from wsgiref.simple_server import WSGIServer

import requests
import requests.adapters
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.client import BULK_STATUS, MailPartnerClient
from exporter.collector import MailPartnerCollector
from exporter.config import API_KEY_ENV, ApiConfig, Config, ConfigErrors, MessageSpec, load_config
from exporter.config.errors import ConfigError, InvalidValueError, SecretError
from exporter.config.holder import ConfigHolder
from exporter.demo import Demo
from exporter.poller import Poller
from exporter.secret import Redactor, Secret
from exporter.shard import NO_SHARD_FLAGS, ShardFlags, check_index, parse_count, parse_index
from exporter.state import MEMORY, StateStore, StateStoreError
from exporter.stats import RequestStats
from exporter.tracker import MessageBook
from exporter.web import create_app, serve

log = logging.getLogger("exporter")
# How often the main loop saves state and looks for demo sends; signals wake it at once.
_HOUSEKEEPING = 10.0
# On SIGTERM, how long polls in flight may take to finish.
_DRAIN_TIMEOUT = 5.0
# What errors about flags name instead of a file.
COMMAND_LINE = "command line"


def load_runnable(
    path: str,
    demo: bool,
    shard_flags: ShardFlags = NO_SHARD_FLAGS,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load ``path``; beyond ``load_config``'s checks, a key is needed unless in demo mode.

    ``--shard.count`` / ``--shard.index``, when given, override the file's ``shard`` section.
    """
    config = load_config(path, environ)
    if config.api.api_key is None and not demo:
        raise ConfigErrors([_no_key(config.file)])
    return apply_shard_flags(config, shard_flags, environ)


def apply_shard_flags(
    config: Config, flags: ShardFlags, environ: Mapping[str, str] | None = None
) -> Config:
    """``config`` with the shard flags given applied; ConfigErrors naming the flag if wrong."""
    if flags.count is None and flags.index is None:
        return config
    problems: list[ConfigError] = []
    count, index = config.shard_count, config.shard_index
    if flags.count is not None:
        try:
            count = parse_count(flags.count)
        except (TypeError, ValueError) as e:
            problems.append(InvalidValueError(COMMAND_LINE, "--shard.count", str(e)))
    if flags.index is not None:
        try:
            index = parse_index(flags.index, environ)
        except (TypeError, ValueError) as e:
            problems.append(InvalidValueError(COMMAND_LINE, "--shard.index", str(e)))
    if not problems:
        count_name = "--shard.count" if flags.count is not None else "shard.count"
        try:
            check_index(index, count, count_name)
        except ValueError as e:
            if flags.index is not None:
                problems.append(InvalidValueError(COMMAND_LINE, "--shard.index", str(e)))
            else:
                problems.append(InvalidValueError(config.file, "shard.index", str(e)))
    if problems:
        raise ConfigErrors(problems)
    return dataclasses.replace(config, shard_count=count, shard_index=index)


def owned_messages(config: Config) -> tuple[MessageSpec, ...]:
    """The configured messages this exporter's shard polls (all of them unless sharded)."""
    return config.shard.select(config.messages)


def tracking_fields(config: Config) -> dict[str, object]:
    """Log fields: how many messages are polled here, and the shard when sharded."""
    fields: dict[str, object] = {"messages": len(owned_messages(config))}
    if config.shard.sharded:
        fields["shard"] = str(config.shard)
        fields["configured"] = len(config.messages)
    return fields


def _no_key(file: str) -> SecretError:
    return SecretError(
        file,
        "api",
        f"no API key: set api.api_key_file, api.api_key or the {API_KEY_ENV} environment variable",
    )


class Exporter:
    """client → poller → book → collector, rebuilt in place on reload."""

    def __init__(
        self,
        config: Config,
        path: str,
        demo: Demo | None = None,
        on_secrets: Callable[[Redactor], None] = lambda redactor: None,
        shard_flags: ShardFlags = NO_SHARD_FLAGS,
    ) -> None:
        now = time.time()
        self._path = path
        self._shard_flags = shard_flags  # kept for reloads: flags beat the file
        self._demo = demo
        self._on_secrets = on_secrets
        self._secrets: list[Secret | None] = []
        self._lock = threading.Lock()  # one reload at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload_requested = False
        self._saved_changes = -1
        config = demo.apply(config) if demo else config
        self.holder = ConfigHolder(config, now)
        self.book = MessageBook(config.polling)
        # The demo's simulated world starts afresh each run: it keeps no state.
        self._store = StateStore(MEMORY if demo else config.state_path)
        stored = self._store.load()
        if self._store.problem:
            log.warning(self._store.problem)
        if stored is not None:
            self.book.restore(stored)
            log.info(
                "state restored",
                extra={"path": config.state_path, "messages": len(stored.messages)},
            )
        # Only this shard's messages are tracked, so only they are polled and exposed.
        self.book.sync(owned_messages(config), now)
        self.stats = RequestStats([BULK_STATUS])
        self.poller = Poller(config, self.book, self._client(config.api))
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(MailPartnerCollector(self.book, self.stats, self.holder))

    def _client(self, api: ApiConfig) -> MailPartnerClient:
        # Every key ever loaded stays scrubbed from the logs, old ones included.
        self._secrets.append(api.api_key)
        self._on_secrets(Redactor(*self._secrets))
        session = requests.Session()
        session.headers["User-Agent"] = f"mailpartner-exporter/{__version__}"
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=api.concurrency)  # one per poll
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        return MailPartnerClient(api, session, self.stats, Redactor(api.api_key))

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
                self.holder.failed()
                log.error(
                    "reload failed, keeping the previous configuration", extra={"err": str(e)}
                )
                return str(e)
            if self._demo is not None:
                config = self._demo.apply(config)
            same_api = config.api == self.holder.config.api
            client = self.poller.client if same_api else self._client(config.api)
            now = time.time()
            self.book.reconfigure(config.polling)
            self.book.sync(owned_messages(config), now)
            self.poller.reconfigure(config, client)
            self.holder.swap(config, now)
        log.info("configuration reloaded", extra=tracking_fields(config))
        return None

    def request_reload(self) -> None:
        """Ask the main loop to reload (safe from a signal handler)."""
        self._reload_requested = True
        self._wake.set()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.poller.wake()

    def serve(
        self, address: str, telemetry_path: str, web_config_path: str | None = None
    ) -> WSGIServer:
        app = create_app(
            self.registry, self.book, telemetry_path=telemetry_path, reload=self.reload
        )
        return serve(app, address, web_config_path)

    def run(self, server: WSGIServer) -> int:
        """Poll and serve until ``request_stop``; then let polls in flight finish."""
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
                shard = self.holder.config.shard
                for spec in self._demo.new_messages():
                    if shard.owns(spec.id):  # another shard polls the others
                        self.book.add(spec, time.time())
                        log.info("demo send", extra={"message_id": spec.id})
                self.poller.wake()
        if not self.poller.drain(_DRAIN_TIMEOUT):
            log.warning("polls still in flight at shutdown were abandoned")
        self.save()
        self._store.close()
        server.shutdown()
        server.server_close()
        return 0

    def save(self) -> None:
        """Write the state file if anything changed; a failure is logged, never raised."""
        changes = self.book.changes
        if changes == self._saved_changes:
            return
        try:
            self._store.save(self.book.export(time.time()))
        except StateStoreError as e:
            log.error("cannot save state", extra={"err": str(e)})
        else:
            self._saved_changes = changes
