"""``Options``: how a source reads its section under ``sources:``.

Every value is checked with the same rules and reported with the same
``file: sources.<name>.<key>: problem`` errors as the rest of the config, and a key the
source never asked for is an error ("unknown key"), so a typo is never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from exporter.config import convert, errors
from exporter.config.convert import join, kind
from exporter.config.model import ApiConfig
from exporter.domain import MessageSpec

if TYPE_CHECKING:
    from exporter.config.loader import ConfigReader

T = TypeVar("T")


class Options:
    """One source's section; each method reads one key (absent: the default)."""

    def __init__(self, reader: ConfigReader, key: str, section: Mapping[str, Any]) -> None:
        self._reader = reader
        self.key = key  # "sources.<name>"
        self._section = dict(section)
        self._read: set[str] = set()

    @property
    def file(self) -> str:
        """The config file; relative paths in options are relative to its folder."""
        return self._reader.file

    def __contains__(self, name: str) -> bool:
        return name in self._section

    def fail(self, name: str, problem: str) -> None:
        """Report a problem with key ``name`` of this section."""
        self._reader.fail(errors.InvalidValueError, join(self.key, name), problem)

    def duration(self, name: str, default: float) -> float:
        """A positive duration such as ``5m``, in seconds."""
        return self._field(name, default, convert.positive_duration)

    def integer(self, name: str, default: int) -> int:
        """An integer of at least 1."""
        return self._field(name, default, convert.positive_int)

    def boolean(self, name: str, default: bool) -> bool:
        return self._field(name, default, convert.boolean)

    def string(self, name: str, default: str) -> str:
        return self._field(name, default, convert.string)

    def numbers(self, name: str) -> Mapping[str, float]:
        """A mapping of names to numbers (thresholds per field, say)."""
        value = self._take(name)
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, dict):
            self.fail(name, f"must be a mapping of names to numbers, not {kind(value)}")
            return MappingProxyType({})
        numbers: dict[str, float] = {}
        for field, number in value.items():
            if isinstance(number, bool) or not isinstance(number, int | float):
                self.fail(f"{name}.{field}", f"must be a number, not {kind(number)}")
            else:
                numbers[str(field)] = float(number)
        return MappingProxyType(numbers)

    def messages(self, name: str) -> tuple[MessageSpec, ...]:
        """A list of messages in the form of the top-level ``messages``."""
        return self._reader.messages(self._take(name), join(self.key, name))

    def globs(self, name: str) -> tuple[str, ...]:
        """File globs in the form of ``message_files``."""
        return self._reader.globs(self._take(name), join(self.key, name))

    def api(self, name: str, defaults: ApiConfig, env: str, upstream: str) -> ApiConfig:
        """An API section in the form of the top-level ``api``; the key may come from ``env``."""
        return self._reader.api(self._take(name), join(self.key, name), defaults, env, upstream)

    def finish(self) -> None:
        """Report every key the source did not read."""
        allowed = frozenset(self._read) | {"enabled"}
        for name in self._section.keys() - self._read:
            self._reader.fail(
                errors.UnknownKeyError, join(self.key, str(name)), convert.unknown(name, allowed)
            )

    def _take(self, name: str) -> Any:
        self._read.add(name)
        return self._section.get(name)

    def _field(self, name: str, default: T, check: Callable[[Any], T]) -> T:
        self._read.add(name)
        return self._reader.field(self._section, name, self.key, default, check)
