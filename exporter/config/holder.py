"""The configuration in force, and how the last load went (for the reload metrics)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from exporter.config.model import Config


@dataclass(frozen=True)
class LoadStatus:
    successful: bool
    last_success: float


class ConfigHolder:
    def __init__(self, config: Config, now: float) -> None:
        self._lock = threading.Lock()
        self._config = config
        self._status = LoadStatus(True, now)

    @property
    def config(self) -> Config:
        with self._lock:
            return self._config

    @property
    def status(self) -> LoadStatus:
        with self._lock:
            return self._status

    def swap(self, config: Config, now: float) -> None:
        with self._lock:
            self._config = config
            self._status = LoadStatus(True, now)

    def failed(self) -> None:
        """A reload failed: the old config stays in force."""
        with self._lock:
            self._status = LoadStatus(False, self._status.last_success)
