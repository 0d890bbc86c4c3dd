"""SMS Partner, Mail Partner's sister API, as the simulator serves it under ``/smspartner/v1``.

Its sends live in a World of their own (``sms_world``): seeded from the mail world's seed
and ``:sms``, on the same clock, at ``SMS_PRICE`` per recipient.  Recipient fates are drawn
as in a mail world and read in SMS Partner's lower case: ``waiting``, then ``delivered``,
``not delivered`` or, for the rare tail of outcomes, ``ko``.  Phone numbers are fake and follow
the recipient's index (``+33600000000``, ``+33600000001``, ...).

``/me`` counts ``creditSms`` down by one per recipient sent; the simulator sends neither ECO
SMS nor HLR lookups, so ``creditSmsECO`` and ``creditHlr`` stay at their starting values.
"""

from __future__ import annotations

import zlib

from exporter.simulator.api import PartnerApi, Usage, money
from exporter.simulator.formats import Payload
from exporter.simulator.model import WAITING, World

SMS_PRICE = 0.045
STARTING_SMS_BALANCE = 450.0
STARTING_SMS_CREDITS = 10_000
SMS_ECO_CREDITS = 15_000
HLR_CREDITS = 20_000
# The mail outcomes SMS Partner has a word for; every other one reads "ko".
_SMS_STATUSES = {WAITING: "waiting", "Delivered": "delivered", "Not delivered": "not delivered"}


def sms_status(status: str) -> str:
    """A mail world's status as SMS Partner writes it."""
    return _SMS_STATUSES.get(status, "ko")


def phone_number(index: int) -> str:
    """Recipient ``index``'s fake French mobile number."""
    return f"+336{index % 100_000_000:08d}"


def sms_world_beside(world: World) -> World:
    """The SMS account next to the mail account ``world``: another seed, the same clock and
    commercial restriction."""

    def clock() -> float:
        return world.clock()  # looked up each time: follows the mail world's clock if swapped

    return World(
        seed=zlib.crc32(f"{world.seed}:sms".encode()),
        clock=clock,
        cost_per_recipient=SMS_PRICE,
        holds_commercial=world.holds_commercial,
    )


class SmsPartnerApi(PartnerApi):
    """api.smspartner.fr ``/v1``.

    ``/me`` answers, e.g.: ``"credits": {"creditSms": 9000, "creditSmsECO": 15000,
    "creditHlr": 20000, "toSend": 0, "solde": "405.000", "currency": "EUR",
    "balance": "405.000"}``.
    """

    def status_payload(self, message_id: str) -> Payload:
        reports = [
            {
                "phoneNumber": phone_number(index),
                "status": sms_status(report.status),
                "cost": report.cost,
                "stopSMS": report.stop_mail,
                "date": str(report.date),
            }
            for index, report in enumerate(self.world.reports(message_id))
        ]
        return {
            "success": True,
            "code": 200,
            "message_id": message_id,
            "StatutResponse_List": reports,
        }

    def credits(self, usage: Usage) -> Payload:
        balance = money(STARTING_SMS_BALANCE - usage.cost)
        return {
            "creditSms": max(0, STARTING_SMS_CREDITS - usage.recipients),
            "creditSmsECO": SMS_ECO_CREDITS,
            "creditHlr": HLR_CREDITS,
            "toSend": usage.waiting,
            "solde": balance,
            "currency": "EUR",
            "balance": balance,
        }
