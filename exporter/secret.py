"""The API key, and scrubbing it from anything that leaves the process.

Mail Partner takes the key in the query string, so it ends up in URLs, and
``requests``/``urllib3`` put URLs in their exception messages. Everything
that can reach a log line, a page or a metric goes through ``redact``.
"""

from __future__ import annotations

import re

_QUERY_KEY = re.compile(r"(apiKey=)[^&#\s'\"]*", re.IGNORECASE)
REDACTED = "<redacted>"


class Secret:
    """A string that never shows itself in ``str``, ``repr`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('<redacted>')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Redactor:
    """Removes the given secrets, and any ``apiKey=`` query value, from text."""

    def __init__(self, *secrets: Secret | None) -> None:
        # Keys shorter than 4 characters would mangle ordinary words; the
        # query-string pattern still covers them in URLs.
        self._values = tuple(s.reveal() for s in secrets if s and len(s.reveal()) >= 4)

    def __call__(self, text: str) -> str:
        text = _QUERY_KEY.sub(r"\1" + REDACTED, text)
        for value in self._values:
            text = text.replace(value, REDACTED)
        return text
