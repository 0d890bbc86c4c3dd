"""Mail Partner's sending calendar: working hours, weekends and French public holidays."""

from __future__ import annotations

import datetime as dt

import pytest

from exporter.calendar import PARIS, describe_release, easter, held, holidays, release


def paris(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=PARIS).timestamp()


@pytest.mark.parametrize(
    ("year", "sunday"),
    [
        (2024, "2024-03-31"),
        (2025, "2025-04-20"),
        (2026, "2026-04-05"),
        (2027, "2027-03-28"),
        (2038, "2038-04-25"),
        (2000, "2000-04-23"),
        (2019, "2019-04-21"),
    ],
)
def test_easter_sunday(year: int, sunday: str) -> None:
    assert easter(year) == dt.date.fromisoformat(sunday)


def test_the_eleven_french_public_holidays_of_2026() -> None:
    assert sorted(holidays(2026)) == [
        dt.date.fromisoformat(d)
        for d in (
            "2026-01-01",
            "2026-04-06",
            "2026-05-01",
            "2026-05-08",
            "2026-05-14",
            "2026-05-25",
            "2026-07-14",
            "2026-08-15",
            "2026-11-01",
            "2026-11-11",
            "2026-12-25",
        )
    ]


@pytest.mark.parametrize(
    ("sent", "out"),
    [
        ("2026-12-02T10:00", "2026-12-02T10:00"),  # Wednesday, working hours: at once
        ("2026-12-02T07:59", "2026-12-02T08:00"),  # before opening: the same morning
        ("2026-12-02T08:00", "2026-12-02T08:00"),
        ("2026-12-02T19:59", "2026-12-02T19:59"),
        ("2026-12-02T20:00", "2026-12-03T08:00"),  # closing: the next morning
        ("2026-12-04T21:00", "2026-12-07T08:00"),  # Friday evening: Monday
        ("2026-12-05T12:00", "2026-12-07T08:00"),  # Saturday
        ("2026-12-06T23:59", "2026-12-07T08:00"),  # Sunday night
        ("2026-04-03T20:30", "2026-04-07T08:00"),  # Friday before Easter: Tuesday
        ("2026-05-13T21:00", "2026-05-15T08:00"),  # eve of Ascension Thursday
        ("2026-12-24T20:00", "2026-12-28T08:00"),  # Christmas Eve, a Thursday: Monday
        ("2026-10-25T01:30", "2026-10-26T08:00"),  # the night clocks go back
        ("2026-03-29T02:30", "2026-03-30T08:00"),  # ... and forward (02:30 does not exist)
    ],
)
def test_release_is_the_next_opening(sent: str, out: str) -> None:
    assert release(paris(sent)) == paris(out)
    assert held(paris(sent)) == (sent != out)


def test_the_release_reads_as_an_operator_would() -> None:
    friday = paris("2026-12-04T21:00")
    assert describe_release(release(friday), friday) == "Mon 08:00"
    assert describe_release(paris("2026-12-05T08:00"), paris("2026-12-05T02:00")) == "08:00"
    assert describe_release(paris("2026-12-28T08:00"), paris("2026-12-05T02:00")) == (
        "2026-12-28 08:00"
    )
