"""``example``: how many recipients Mail Partner still has to send, from ``GET /v1/me``.

The smallest useful source plugin for mailpartner-exporter (see docs/plugins.md). Enable it
with ``sources: {example: {every: 1m}}``. Sample exposition::

    mailpartner_example_pending_sends 1250.0
    mailpartner_example_poll_success 1.0
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from prometheus_client.core import Metric

from exporter.client import TransportError
from exporter.config.options import Options
from exporter.sources import PeriodicSource, Settings, SourceContext


class PendingSendsSource(PeriodicSource):
    """``credits.toSend`` of ``GET /v1/me``: recipients accepted but not sent yet."""

    default_every: ClassVar[float] = 60.0

    def __init__(self, context: SourceContext, settings: Settings) -> None:
        super().__init__(context, settings)
        self._values_lock = threading.Lock()
        self._pending: float | None = None  # None until the first good answer

    @classmethod
    def configure(cls, options: Options) -> Settings:
        # Every key read here is allowed under sources.example; any other key is an error.
        return {"every": options.duration("every", cls.default_every)}

    def fetch(self) -> None:
        # On a poll thread, when the budget allows; counted under endpoint="me".
        answer = self.upstream.client.get_json("me")
        pending = to_send(answer)
        if pending is None:
            raise TransportError("invalid_response", "no number at credits.toSend")
        with self._values_lock:
            self._pending = pending

    def collect(self) -> Iterable[Metric]:
        # On a scrape thread: read what the last good poll left, never call the API.
        with self._values_lock:
            pending = self._pending
        if pending is not None:
            sends = Metric(
                "mailpartner_example_pending_sends",
                "Recipients still to send (credits.toSend of GET /v1/me, last good answer).",
                "gauge",
            )
            sends.add_sample("mailpartner_example_pending_sends", {}, pending)
            yield sends
        success = Metric(
            "mailpartner_example_poll_success",
            "1 if the last poll of GET /v1/me for pending sends succeeded.",
            "gauge",
        )
        success.add_sample("mailpartner_example_poll_success", {}, 1 if self.ok else 0)
        yield success


def to_send(answer: Mapping[str, Any]) -> float | None:
    """``credits.toSend`` as a number (the API may write numbers as strings); None if absent."""
    credits = answer.get("credits")
    value = credits.get("toSend") if isinstance(credits, dict) else None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
