"""``--demo``: the embedded simulator on loopback, with sends to watch and no account."""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Iterable
from types import MappingProxyType

from exporter.config.model import ApiConfig, Config, SourceConfig
from exporter.domain import MessageSpec
from exporter.secret import Secret
from exporter.simulator import DemoCampaign, SimulatedSend, SimulatorServer, World
from exporter.simulator.demo import KEEP, MAX_RECIPIENTS
from exporter.simulator.model import Clock

DEMO_KEY = "demo-key"
DEMO_SMS_KEY = "demo-sms-key"


class Demo:
    """Runs the simulator and tells the exporter about every send it makes."""

    def __init__(self, seed: int = 1, clock: Clock = time.time) -> None:
        self._world = World(seed=seed, clock=clock)
        self._server = SimulatorServer(self._world, api_key=DEMO_KEY, sms_api_key=DEMO_SMS_KEY)
        # Campaigns every three minutes and a one-recipient send every five seconds.
        self._campaign = DemoCampaign(self._world)
        self._started: list[MessageSpec] = []
        # The later sends, with when each goes out, for as long as the simulator keeps them
        # (49 h from then): a reload puts them in the new config; the stream makes 17,000 a day.
        self._new: list[tuple[float, MessageSpec]] = []

    def start(self) -> None:
        self._server.start()
        self._started = [_spec(send) for send in self._campaign.start()]

    def apply(self, config: Config) -> Config:
        """``config`` pointed at the simulator, with the demo's sends added (the later ones
        for as long as the simulator keeps them).

        The configured messages are sent by the simulator too (sizes derived
        from their IDs), so the shipped ``config.yaml`` shows data as-is; so are
        SMS Partner's, when its source is on.
        """
        _send_all(self._world, config.messages)
        return dataclasses.replace(
            config,
            api=dataclasses.replace(
                config.api, base_url=self._server.url, api_key=Secret(DEMO_KEY)
            ),
            messages=(*config.messages, *self._started, *(spec for _, spec in self._new)),
            sources=None if config.sources is None else tuple(map(self._sms, config.sources)),
        )

    def _sms(self, source: SourceConfig) -> SourceConfig:
        api = source.settings.get("api")
        if not isinstance(api, ApiConfig):
            return source
        _send_all(self._server.sms_world, source.settings.get("messages", ()))
        api = dataclasses.replace(api, base_url=self._server.sms_url, api_key=Secret(DEMO_SMS_KEY))
        settings = MappingProxyType({**source.settings, "api": api})
        return dataclasses.replace(source, settings=settings)

    def new_messages(self) -> list[MessageSpec]:
        """Sends the simulator made since the last call."""
        new = [(send.goes_out, _spec(send)) for send in self._campaign.due()]
        horizon = self._world.clock() - KEEP
        # Held and deferred sends go out out of order: filtered, not popped from the left.
        self._new = [(out, spec) for out, spec in self._new if out >= horizon] + new
        return [spec for _, spec in new]

    def stop(self) -> None:
        self._server.stop()


def _send_all(world: World, messages: Iterable[MessageSpec]) -> None:
    for spec in messages:
        if world.get(spec.id) is None:
            world.send(
                # 50 to 500 recipients: one message ID is one send, at most 500 recipients.
                50 + zlib.crc32(spec.id.encode()) % (MAX_RECIPIENTS - 50 + 1),
                message_id=spec.id,
                sent_at=spec.sent_at,
                campaign=spec.labels.get("campaign", "demo"),
            )


def _spec(send: SimulatedSend) -> MessageSpec:
    """What the sending application would register: a commercial send is one the platform
    holds out of hours; the others (the transactional stream) are marked so."""
    return MessageSpec(
        send.message_id,
        MappingProxyType({"campaign": send.campaign}),
        send.sent_at,
        scheduled_at=send.scheduled_at,
        transactional=not send.commercial,
    )
