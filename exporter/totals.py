"""The aggregate counters: recipients reaching each state, cost, unsubscribed recipients,
messages and the delivery-delay histogram, by the message labels ``metrics.aggregate_by`` names.

They only grow. Each poll adds what it found beyond the message's previous poll, so a re-poll,
a restart (messages come back with their last values) or a reload counts nothing twice, and a
message forgotten after its retention takes nothing away. At most ``max_aggregate_label_sets``
label sets are kept: a message with yet another set counts under the one whose labels are all
``__other__``, and in ``overflow``. Not thread-safe: the ``MessageBook``'s lock guards it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from exporter.aggregate import MessageAggregate
from exporter.config.model import MetricsConfig
from exporter.domain import State

OTHER = "__other__"
LabelSet = tuple[tuple[str, str], ...]  # (name, value) in aggregate_by order
log = logging.getLogger(__name__)


@dataclass
class Tally:
    """One label set's counters. ``delays`` has one count per bucket, then +Inf."""

    recipients: dict[State, int] = field(default_factory=lambda: dict.fromkeys(State, 0))
    cost: float = 0.0
    unsubscribed: int = 0
    messages: int = 0
    delays: list[int] = field(default_factory=list)
    delay_sum: float = 0.0

    def copy(self) -> Tally:
        return dataclasses.replace(self, recipients=dict(self.recipients), delays=list(self.delays))

    def merge(self, other: Tally) -> None:
        for state, count in other.recipients.items():
            self.recipients[state] += count
        self.cost += other.cost
        self.unsubscribed += other.unsubscribed
        self.messages += other.messages
        if len(other.delays) == len(self.delays):
            self.delays = [a + b for a, b in zip(self.delays, other.delays, strict=True)]
            self.delay_sum += other.delay_sum


@dataclass(frozen=True)
class TotalsSnapshot:
    """The counters at one moment, for a scrape or the state file."""

    # The label names counted by when taken (a snapshot read from a file keys its tallies by
    # every label saved instead): not part of what the counts are.
    aggregate_by: tuple[str, ...] = field(compare=False)
    buckets: tuple[float, ...]
    tallies: Mapping[LabelSet, Tally]
    overflow: int
    # Bumped on every change: a scrape renders the series again only when it moved.
    version: int = field(default=0, compare=False)

    @property
    def recipients(self) -> dict[State, int]:
        """Recipients per state over every label set."""
        return {s: sum(t.recipients[s] for t in self.tallies.values()) for s in State}

    @property
    def cost(self) -> float:
        return sum(t.cost for t in self.tallies.values())


class Totals:
    def __init__(self, metrics: MetricsConfig) -> None:
        self._metrics = metrics
        self._tallies: dict[LabelSet, Tally] = {}
        self.overflow = 0
        self._version = 0
        self._snapshot: TotalsSnapshot | None = None
        self._tally({})  # the empty set always has series, at zero until something counts

    def reconfigure(self, metrics: MetricsConfig) -> None:
        """Count by ``metrics`` from now on; the counts so far move to their new label sets."""
        if metrics == self._metrics:
            return
        self._changed()
        old, self._metrics = self._tallies, metrics
        self._tallies = {}
        self._tally({})
        self._take(
            ((dict(key), tally) for key, tally in old.items()), metrics.delivery_delay_buckets
        )

    def seen(self, labels: Mapping[str, str]) -> None:
        """A message first seen: one more in its label set's ``messages``."""
        self._changed()
        self._tally(labels, new=True).messages += 1

    def grow(
        self, labels: Mapping[str, str], before: MessageAggregate | None, after: MessageAggregate
    ) -> None:
        """Add what ``after`` (a poll) found beyond ``before`` (the message's previous one)."""
        self._changed()
        tally = self._tally(labels)
        for state, count in after.states.items():
            tally.recipients[state] += max(0, count - (before.states[state] if before else 0))
        tally.cost += max(0.0, after.cost - (before.cost if before else 0.0))
        tally.unsubscribed += max(0, after.unsubscribed - (before.unsubscribed if before else 0))
        if len(after.delays) != len(tally.delays):
            return  # counted with other buckets: nothing to compare with
        prior = before.delays if before is not None and before.delays else None
        if prior is None:
            growth = list(after.delays)
            sum_growth = after.delay_sum
        elif len(prior) == len(after.delays):
            growth = [max(0, b - a) for a, b in zip(prior, after.delays, strict=True)]
            sum_growth = max(0.0, after.delay_sum - before.delay_sum) if before else 0.0
        else:
            return  # the buckets changed between the two polls
        tally.delays = [a + b for a, b in zip(tally.delays, growth, strict=True)]
        tally.delay_sum += sum_growth

    def snapshot(self) -> TotalsSnapshot:
        """The counts now: the same object until something changes."""
        if self._snapshot is None:
            metrics = self._metrics
            self._snapshot = TotalsSnapshot(
                metrics.aggregate_by,
                metrics.delivery_delay_buckets,
                {key: tally.copy() for key, tally in self._tallies.items()},
                self.overflow,
                self._version,
            )
        return self._snapshot

    def _changed(self) -> None:
        self._version += 1
        self._snapshot = None

    def restore(self, snapshot: TotalsSnapshot) -> None:
        """Take back saved counts (another ``aggregate_by`` or buckets: re-sorted to these)."""
        self._changed()
        self.overflow = snapshot.overflow
        saved = ((dict(key), tally) for key, tally in snapshot.tallies.items())
        self._take(saved, snapshot.buckets)

    def _take(
        self, tallies: Iterable[tuple[dict[str, str], Tally]], buckets: tuple[float, ...]
    ) -> None:
        kept = buckets == self._metrics.delivery_delay_buckets
        if buckets and not kept:
            log.warning("delivery delay buckets changed: the histogram starts again from zero")
        for labels, tally in tallies:
            moved = tally.copy()
            if not kept:
                moved.delays, moved.delay_sum = [], 0.0
            self._tally(labels).merge(moved)

    def _tally(self, labels: Mapping[str, str], new: bool = False) -> Tally:
        by = self._metrics.aggregate_by
        key = tuple((name, labels.get(name, "")) for name in by)
        tally = self._tallies.get(key)
        if tally is not None:
            return tally
        other = tuple((name, OTHER) for name in by)
        if len(self._tallies) - (other in self._tallies) >= self._metrics.max_aggregate_label_sets:
            if new:
                self.overflow += 1
            key = other
            tally = self._tallies.get(key)
        if tally is None:
            buckets = len(self._metrics.delivery_delay_buckets) + 1
            tally = self._tallies[key] = Tally(delays=[0] * buckets)
        return tally


def label_sets(snapshot: TotalsSnapshot) -> Iterator[tuple[dict[str, str], Tally]]:
    """Each label set as a label dict, with its counters."""
    for key, tally in snapshot.tallies.items():
        yield dict(key), tally
