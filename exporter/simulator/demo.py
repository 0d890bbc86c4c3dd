"""A believable account to look at: sends of every age, and a new one every few minutes."""

from __future__ import annotations

import random

from exporter.simulator.model import SimulatedSend, World

# (age in seconds, recipients, campaign): one send in each phase a message goes through,
# from "reports still arriving" to "an hour short of final".
_BUILT_IN = (
    (20, 120, "welcome"),
    (8 * 60, 300, "password-reset"),
    (45 * 60, 5000, "newsletter"),
    (3 * 3600, 2500, "promo"),
    (20 * 3600, 800, "invoice"),
    (47 * 3600, 1500, "reactivation"),
)
_CAMPAIGNS = tuple(campaign for _, _, campaign in _BUILT_IN)


class DemoCampaign:
    def __init__(self, world: World, *, interval: float = 180.0) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self._world = world
        self._interval = interval
        self._rng = random.Random(f"{world.seed}:demo")  # noqa: S311 - replayable, not secret
        self._next_at = world.clock() + interval

    def start(self) -> list[SimulatedSend]:
        """The built-in sends, dated in the past relative to the world's clock."""
        now = self._world.clock()
        return [
            self._world.send(recipients, sent_at=now - age, campaign=campaign)
            for age, recipients, campaign in _BUILT_IN
        ]

    def due(self) -> list[SimulatedSend]:
        """The sends scheduled since the last call, each dated at its own slot."""
        now = self._world.clock()
        sends = []
        while self._next_at <= now:
            sends.append(
                self._world.send(
                    self._rng.randint(50, 5000),
                    sent_at=self._next_at,
                    campaign=self._rng.choice(_CAMPAIGNS),
                )
            )
            self._next_at += self._interval
        return sends
