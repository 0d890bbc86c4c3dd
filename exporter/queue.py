"""Message IDs ordered by a time, for the poll loop: which poll is due, which message expires.

A heap with lazy deletion: pushing again for a changed time leaves the old entry in place,
and entries that no longer match the message are skipped when they come up. Each step of
the loop therefore costs O(log n), not a scan of every tracked message.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class TimeQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []

    def push(self, when: float, message_id: str) -> None:
        heapq.heappush(self._heap, (when, message_id))

    def pop_due(self, now: float, limit: int, current: Callable[[str, float], bool]) -> list[str]:
        """Up to ``limit`` IDs whose time has come, earliest first (ties by ID).

        ``current(id, when)`` tells whether an entry still describes its message.
        """
        heap, due, seen = self._heap, list[str](), set[str]()
        while heap and len(due) < limit and heap[0][0] <= now:
            when, message_id = heapq.heappop(heap)
            if message_id not in seen and current(message_id, when):
                seen.add(message_id)
                due.append(message_id)
        return due

    def first(self, current: Callable[[str, float], bool]) -> float | None:
        """The earliest time still current, dropping stale entries on the way."""
        heap = self._heap
        while heap and not current(heap[0][1], heap[0][0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def __len__(self) -> int:
        return len(self._heap)


class TakingTurns:
    """Two ``TimeQueue``s served in turn: the preferred one (the operator's own messages)
    and the others (registrations, demo sends). A backlog in one costs the other at most
    every other place, never a wait behind it; alone, either has every place."""

    def __init__(self) -> None:
        self._queues = (TimeQueue(), TimeQueue())
        self._turn = 0

    def push(self, when: float, message_id: str, preferred: bool) -> None:
        self._queues[0 if preferred else 1].push(when, message_id)

    def pop_due(self, now: float, limit: int, current: Callable[[str, float], bool]) -> list[str]:
        """Up to ``limit`` IDs whose time has come, one from each queue in turn."""
        due: dict[str, None] = {}  # an ID moved between the queues may be in both
        empty = [False, False]
        while len(due) < limit and not all(empty):
            turn, self._turn = self._turn, 1 - self._turn
            if not empty[turn]:
                found = self._queues[turn].pop_due(now, 1, current)
                empty[turn] = not found
                due.update(dict.fromkeys(found))
        return list(due)

    def first(self, current: Callable[[str, float], bool]) -> float | None:
        return min((t for q in self._queues if (t := q.first(current)) is not None), default=None)
