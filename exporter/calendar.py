"""When Mail Partner sends commercial email: its sending calendar, in Europe/Paris time.

The platform holds commercial email outside working hours — 20:00 to 08:00, all weekend and
on French public holidays — until the next working day at 08:00, unless the account has that
restriction lifted. A Friday-evening newsletter is first delivered on Monday at 08:00, and on
the Tuesday when Monday is Easter Monday. Transactional email is never held.

Pure functions over epoch seconds; nothing here imports from the rest of the package.
"""

from __future__ import annotations

import datetime as dt
import functools
from zoneinfo import ZoneInfo

PARIS = ZoneInfo("Europe/Paris")
OPENS = dt.time(8, 0)  # the first minute email goes out on a working day
CLOSES = dt.time(20, 0)  # from here on, held until the next working day opens
# Fixed-date French public holidays (month, day); Easter Monday, Ascension Thursday and
# Whit Monday move with Easter.
_FIXED = ((1, 1), (5, 1), (5, 8), (7, 14), (8, 15), (11, 1), (11, 11), (12, 25))
_EASTER_OFFSETS = (1, 39, 50)  # Easter Monday, Ascension, Whit Monday


def easter(year: int) -> dt.date:
    """Easter Sunday of ``year`` in the Gregorian calendar (the anonymous algorithm)."""
    a, b, c = year % 19, year // 100, year % 100
    d, e = divmod(b, 4)
    f = (b + 8) // 25
    g = (b - f + 1) // 3
    h = (19 * a + b - d - g + 15) % 30
    i, k = divmod(c, 4)
    week = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * week) // 451
    month, day = divmod(h + week - 7 * m + 114, 31)
    return dt.date(year, month, day + 1)


@functools.cache
def holidays(year: int) -> frozenset[dt.date]:
    """France's public holidays in ``year`` (metropolitan; Alsace-Moselle adds two more)."""
    sunday = easter(year)
    moving = {sunday + dt.timedelta(days=n) for n in _EASTER_OFFSETS}
    return frozenset({dt.date(year, month, day) for month, day in _FIXED} | moving)


def working_day(day: dt.date) -> bool:
    return day.weekday() < 5 and day not in holidays(day.year)


def release(when: float) -> float:
    """When email sent at ``when`` goes out: ``when`` itself within working hours, else the
    next working day's 08:00 (Europe/Paris), as epoch seconds."""
    local = dt.datetime.fromtimestamp(when, PARIS)
    day = local.date()
    if working_day(day) and OPENS <= local.time() < CLOSES:
        return when
    if not (working_day(day) and local.time() < OPENS):
        day += dt.timedelta(days=1)
        while not working_day(day):
            day += dt.timedelta(days=1)
    return dt.datetime.combine(day, OPENS, PARIS).timestamp()


def held(when: float) -> bool:
    """Would commercial email sent at ``when`` wait for the next opening?"""
    return release(when) > when


def describe_release(when: float, now: float) -> str:
    """``when`` as an operator reads a release time: ``08:00`` today, ``Mon 08:00`` within a
    week, the date beyond (Europe/Paris)."""
    local = dt.datetime.fromtimestamp(when, PARIS)
    today = dt.datetime.fromtimestamp(now, PARIS).date()
    if local.date() == today:
        return local.strftime("%H:%M")
    if local.date() - today < dt.timedelta(days=7):
        return local.strftime("%a %H:%M")
    return local.strftime("%Y-%m-%d %H:%M")
