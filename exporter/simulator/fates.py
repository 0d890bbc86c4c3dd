"""How each recipient of a simulated send fares: its arrival delay, outcome, unsubscribe flag
and token, drawn once per message from ``random.Random(f"{seed}:{message_id}")``.

Most reports arrive within seconds, some within minutes, a few over hours up to 48 h; most
recipients are delivered, some not, and a rare tail gets other statuses.
"""

from __future__ import annotations

import math
import random
from array import array
from dataclasses import dataclass

# Indexes into this tuple are what a recipient's outcome byte stores.  The rare tail exists so
# that consumers meet both statuses they map (Bounced, ko) and one nobody maps (Deferred).
OUTCOMES = ("Delivered", "Not delivered", "Bounced", "ko", "Deferred")
MAX_DELAY = 48 * 3600.0


@dataclass(frozen=True)
class Fates:
    """Per-recipient draws of one message, as compact arrays (a 1M-recipient send is ~10 MB)."""

    delays: array[float]
    outcomes: bytes
    stop_mail: bytes
    tokens: bytes  # 8 random bytes per recipient, hex-encoded on demand


def _draw_delay(rng: random.Random) -> float:
    band = rng.random()
    if band < 0.80:
        delay = rng.expovariate(1 / 5.0)
    elif band < 0.95:
        delay = rng.expovariate(1 / 600.0)
    else:
        delay = math.exp(rng.uniform(math.log(3600.0), math.log(MAX_DELAY)))
    return min(delay, MAX_DELAY)


def _draw_outcome(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.93:
        return 0
    if roll < 0.99:
        return 1
    return rng.randrange(2, len(OUTCOMES))


def draw_fates(seed: int, message_id: str, recipients: int) -> Fates:
    # Draws run in recipient order, so recipient i's fate does not depend on the send's size.
    rng = random.Random(f"{seed}:{message_id}")  # noqa: S311 - replayable, not secret
    token_rng = random.Random(f"{seed}:{message_id}:tokens")  # noqa: S311 - same reason
    delays = array("d", bytes(8 * recipients))
    outcomes = bytearray(recipients)
    stop_mail = bytearray(recipients)
    for i in range(recipients):
        delays[i] = _draw_delay(rng)
        outcomes[i] = _draw_outcome(rng)
        stop_mail[i] = rng.random() < 0.015
    return Fates(delays, bytes(outcomes), bytes(stop_mail), token_rng.randbytes(8 * recipients))
