"""The running exporter: the pieces built from one config, and what changes them later
(reload, demo sends, shutdown)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

import requests
import requests.adapters
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.client import BULK_STATUS, MailPartnerClient
from exporter.collector import MailPartnerCollector
from exporter.config import API_KEY_ENV, ApiConfig, Config, ConfigErrors, load_config
from exporter.config.errors import SecretError
from exporter.config.holder import ConfigHolder
from exporter.demo import Demo
from exporter.poller import Poller
from exporter.secret import Redactor, Secret
from exporter.state import MEMORY, StateStore, StateStoreError
from exporter.stats import RequestStats
from exporter.tracker import MessageBook
from exporter.web import create_app, serve

log = logging.getLogger("exporter")
# How often the main loop saves state and looks for demo sends; signals wake it at once.
_HOUSEKEEPING = 10.0
# On SIGTERM, how long polls in flight may take to finish.
_DRAIN_TIMEOUT = 5.0


def load_runnable(path: str, demo: bool) -> Config:
    """Load ``path``; beyond ``load_config``'s checks, a key is needed unless in demo mode."""
    config = load_config(path)
    if config.api.api_key is None and not demo:
        raise ConfigErrors([_no_key(config.file)])
    return config


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
    ) -> None:
        now = time.time()
        self._path = path
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
        self.book.sync(config.messages, now)
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
                config = load_runnable(self._path, demo=self._demo is not None)
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
            self.book.sync(config.messages, now)
            self.poller.reconfigure(config, client)
            self.holder.swap(config, now)
        log.info("configuration reloaded", extra={"messages": len(config.messages)})
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
                for spec in self._demo.new_messages():
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
