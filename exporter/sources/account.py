"""``account``: Mail Partner's ``GET /v1/me``, the credits left on the account.

Sample exposition::

    mailpartner_account_credits{field="creditMail"} 98500.0
    mailpartner_account_credits_low_threshold{field="creditMail"} 1000.0
    mailpartner_account_poll_success 1.0
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

from prometheus_client.core import Metric

from exporter.client import ME, TransportError
from exporter.config.options import Options
from exporter.sources.base import PeriodicSource, Poll, Settings, SourceContext

# The field names are not documented: every numeric field of ``credits`` is taken, up to
# this many, so a changed answer cannot explode the series count.
MAX_FIELDS = 32
_MAX_NAME = 64


class AccountSource(PeriodicSource):
    """Every numeric field of the ``credits`` object, as ``mailpartner_account_credits``."""

    name = "account"
    default_every: ClassVar[float] = 300.0

    def __init__(self, context: SourceContext, settings: Settings) -> None:
        super().__init__(context, settings)
        self._credits: Mapping[str, float] = MappingProxyType({})
        self._values_lock = threading.Lock()

    def _polled_here(self) -> bool:
        """One account, however many shards: only shard 0 polls it (and alerts once)."""
        return self.context.config.shard_index == 0

    def due(self, now: float, limit: int) -> Sequence[Poll]:
        return super().due(now, limit) if self._polled_here() else ()

    def next_due(self) -> float | None:
        return super().next_due() if self._polled_here() else None

    @classmethod
    def configure(cls, options: Options) -> Settings:
        return {
            "every": options.duration("every", cls.default_every),
            "low_credits": options.numbers("low_credits"),
        }

    def fetch(self) -> None:
        document = self.upstream.client.get_json(ME)
        credits = credit_fields(document)
        if credits is None:
            raise TransportError("invalid_response", "no credits object in the answer")
        with self._values_lock:
            self._credits = credits

    def collect(self) -> Iterable[Metric]:
        if not self._polled_here():
            return
        with self._values_lock:
            credits = self._credits
        values = Metric(
            "mailpartner_account_credits",
            "Credits left on the account, per field of GET /v1/me (last good answer).",
            "gauge",
        )
        for field, value in sorted(credits.items()):
            values.add_sample("mailpartner_account_credits", {"field": field}, value)
        yield values
        thresholds = Metric(
            "mailpartner_account_credits_low_threshold",
            "sources.account.low_credits: below this, MailPartnerCreditsLow fires.",
            "gauge",
        )
        for field, value in sorted(self.settings.get("low_credits", {}).items()):
            thresholds.add_sample(
                "mailpartner_account_credits_low_threshold", {"field": field}, value
            )
        yield thresholds
        success = Metric(
            "mailpartner_account_poll_success",
            "1 if the last poll of GET /v1/me succeeded.",
            "gauge",
        )
        success.add_sample("mailpartner_account_poll_success", {}, 1 if self.ok else 0)
        yield success


def credit_fields(document: Mapping[str, Any]) -> Mapping[str, float] | None:
    """The numeric fields of ``credits`` (numbers, or strings holding one: ``"10225.119"``);
    None if there is no ``credits`` object."""
    credits = document.get("credits")
    if not isinstance(credits, dict):
        return None
    fields: dict[str, float] = {}
    for name, value in credits.items():
        number = _number(value)
        if number is not None and isinstance(name, str) and 0 < len(name) <= _MAX_NAME:
            fields[name] = number
            if len(fields) == MAX_FIELDS:
                break
    return MappingProxyType(fields)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and len(value) <= 32:
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None
