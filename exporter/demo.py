"""``--demo``: the embedded simulator on loopback, with sends to watch and no account."""

from __future__ import annotations

import dataclasses
import zlib
from types import MappingProxyType

from exporter.config import Config, MessageSpec
from exporter.secret import Secret
from exporter.simulator import DemoCampaign, SimulatedSend, SimulatorServer, World

DEMO_KEY = "demo-key"


class Demo:
    """Runs the simulator and tells the exporter about every send it makes."""

    def __init__(self, seed: int = 1) -> None:
        self._world = World(seed=seed)
        self._server = SimulatorServer(self._world, api_key=DEMO_KEY)
        self._campaign = DemoCampaign(self._world)
        self._sends: list[MessageSpec] = []

    def start(self) -> None:
        self._server.start()
        self._sends = [_spec(send) for send in self._campaign.start()]

    def apply(self, config: Config) -> Config:
        """``config`` pointed at the simulator, with every demo send added.

        The configured messages are sent by the simulator too (sizes derived
        from their IDs), so the shipped ``config.yaml`` shows data as-is.
        """
        for spec in config.messages:
            if self._world.get(spec.id) is None:
                self._world.send(
                    500 + zlib.crc32(spec.id.encode()) % 4500,
                    message_id=spec.id,
                    sent_at=spec.sent_at,
                    campaign=spec.labels.get("campaign", "demo"),
                )
        return dataclasses.replace(
            config,
            api=dataclasses.replace(
                config.api, base_url=self._server.url, api_key=Secret(DEMO_KEY)
            ),
            messages=(*config.messages, *self._sends),
        )

    def new_messages(self) -> list[MessageSpec]:
        """Sends the simulator made since the last call."""
        new = [_spec(send) for send in self._campaign.due()]
        self._sends += new
        return new

    def stop(self) -> None:
        self._server.stop()


def _spec(send: SimulatedSend) -> MessageSpec:
    return MessageSpec(send.message_id, MappingProxyType({"campaign": send.campaign}), send.sent_at)
