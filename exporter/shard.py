"""Sharding: which messages this exporter polls when several split one list between them.

A message belongs to shard ``sha256(id)[:8] % count``: the same in every process, on every
machine and in every Python version (unlike ``hash()``, which is salted per process), so
replicas given the same list and count agree without talking to each other. Where the others
serve (``shard.peer_url``, ``{index}`` replaced by a shard's number) is only for sending a
registration on to the shard that owns its message (``exporter.forward``).

Pure: no import from ``exporter.config``, whose loader uses the converters below.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar
from urllib.parse import urlsplit

AUTO = "auto"
# What shard.peer_url's template has in place of a shard's number.
INDEX = "{index}"
PEER_URL_EXAMPLE = "http://mailpartner-exporter-{index}.mailpartner-exporter-shards:10027"
HOSTNAME_ENV = "HOSTNAME"
# A StatefulSet pod's name: <statefulset name>-<ordinal>.
_ORDINAL = re.compile(r".*-(\d+)")
_INTEGER = re.compile(r"[+-]?\d+")


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


_T = TypeVar("_T", bound=_HasId)


def shard_of(message_id: str, count: int) -> int:
    """The shard, in ``0 .. count-1``, that ``message_id`` belongs to."""
    # surrogatepass: a lone surrogate (a YAML "\ud800" escape) still hashes, never raises.
    digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``; ``Shard.ALL`` (count 1) owns every message.

    ``peer_url`` is where every shard serves, ``{index}`` standing for its number (checked by
    ``parse_peer_url``); None: a shard does not know the others.
    """

    count: int = 1
    index: int = 0
    peer_url: str | None = None

    ALL: ClassVar[Shard]

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"shard count must be at least 1, not {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in 0..{self.count - 1}, not {self.index}")

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def owns(self, message_id: str) -> bool:
        return self.count == 1 or shard_of(message_id, self.count) == self.index

    def owner(self, message_id: str) -> int:
        """The index of the shard that owns ``message_id``."""
        return 0 if self.count == 1 else shard_of(message_id, self.count)

    def peer(self, index: int) -> str | None:
        """The base URL of shard ``index``, or None without ``peer_url``."""
        return None if self.peer_url is None else peer_url_of(self.peer_url, index)

    def select(self, items: Iterable[_T]) -> tuple[_T, ...]:
        """The items (message specs) whose ``id`` this shard owns, in their order."""
        return tuple(item for item in items if self.owns(item.id))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


Shard.ALL = Shard(1, 0)


@dataclass(frozen=True)
class ShardFlags:
    """``--shard.count`` / ``--shard.index`` as given (None: not given, the config decides)."""

    count: str | None = None
    index: str | None = None


NO_SHARD_FLAGS = ShardFlags()


# -- converters: raise ValueError/TypeError with the problem, like the config loader's ----------
def parse_count(value: object) -> int:
    """A shard count: an integer of at least 1 (a string of digits from the command line)."""
    number = _integer(value, "an integer")
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def parse_index(value: object, environ: Mapping[str, str] | None = None) -> int:
    """A shard index: an integer of at least 0, or ``auto`` for the pod ordinal.

    ``auto`` is the number after the last ``-`` of the ``HOSTNAME`` environment variable
    (the host name when it is unset): StatefulSet pods are named ``NAME-0``, ``NAME-1``, …
    Whether it is below the count is for the caller, who knows where the count came from.
    """
    if value == AUTO:
        return ordinal(os.environ if environ is None else environ)
    number = _integer(value, "an integer or auto")
    if number < 0:
        raise ValueError("must be at least 0")
    return number


def ordinal(environ: Mapping[str, str]) -> int:
    """The StatefulSet pod ordinal at the end of the host name."""
    name = environ.get(HOSTNAME_ENV) or socket.gethostname()
    # A fully qualified name's first label is the pod name.
    match = _ORDINAL.fullmatch(name.split(".")[0])
    if match is None:
        raise ValueError(
            f"auto: the host name {name!r} ({HOSTNAME_ENV}) does not end in -<number>,"
            " as StatefulSet pod names (NAME-0, NAME-1, ...) do"
        )
    return int(match[1])


def check_index(index: int, count: int, count_name: str = "the shard count") -> None:
    """Raise ValueError unless ``index`` is below ``count`` (named ``count_name``)."""
    if index >= count:
        raise ValueError(f"is {index}, but must be less than {count_name} ({count})")


def parse_peer_url(value: object, count: int) -> str:
    """``shard.peer_url``: an http(s) URL template holding ``{index}``, a valid URL (host,
    port, no credentials, query or fragment) for every shard ``0 .. count-1``."""
    if not isinstance(value, str):
        kind = "empty" if value is None else type(value).__name__
        raise TypeError(f"must be a URL holding {INDEX}, not {kind}")
    template = value.strip().rstrip("/")
    if INDEX not in template:
        raise ValueError(
            f"must hold {INDEX}, which each shard's number replaces (e.g. {PEER_URL_EXAMPLE})"
        )
    # Before any URL is quoted in a problem: the authority is what precedes the first "/".
    if "@" in template.partition("://")[2].partition("/")[0]:
        raise ValueError(
            "must not hold credentials: a forwarded request carries the client's"
            " Authorization header"
        )
    for index in range(count):
        url = peer_url_of(template, index)
        if problem := _peer_url_problem(url):
            raise ValueError(f"{problem}, for shard {index}: {url!r}")
    return template


def peer_url_of(template: str, index: int) -> str:
    """``template`` with ``{index}`` replaced by ``index`` (nothing else is formatted)."""
    return template.replace(INDEX, str(index))


def _peer_url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a valid URL"
    try:
        parts.port  # noqa: B018 - raises ValueError when out of range or not a number
    except ValueError:
        return "has no valid port (0 to 65535)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if "?" in url or "#" in url:
        return "must not have a query or fragment"
    if re.search(r"[\s{}]", url):
        return f"must have no spaces, nor braces other than {INDEX}"
    return None


def _integer(value: object, what: str) -> int:
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        raise ValueError(f"{value!r} is not {what}")
    kind = "empty" if value is None else type(value).__name__
    raise TypeError(f"must be {what}, not {kind}")
