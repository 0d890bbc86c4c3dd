"""Reading one file's values with every problem collected: the ``Reader`` the config
loader builds on, and the ``messages`` lists that message files and registrations share
with the config, checked the same way wherever they come from."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from exporter.config import convert, errors
from exporter.config.convert import join, kind
from exporter.domain import MessageSpec

# Labels the exporter sets itself, plus the target labels Prometheus attaches.
RESERVED_LABELS = frozenset(
    {
        "message_id",
        "state",
        "status",
        "endpoint",
        "code",
        "reason",
        "phase",
        "version",
        "field",
        "le",
        "quantile",
        "job",
        "instance",
    }
)
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
MAX_LABEL_NAME = 128
# What a ``messages`` entry (a registration, a message file's entry) may say.
_MESSAGE_KEYS = frozenset({"id", "labels", "sent_at", "scheduled_at", "transactional"})
# Labels one message may carry (beyond its ID): each is a series' worth of label pairs.
MAX_LABELS = 10
T = TypeVar("T")


def parse_messages(document: object, file: str, key: str = "messages") -> tuple[MessageSpec, ...]:
    """A ``messages`` list (as in the config) read from ``document``; ``ConfigErrors`` naming
    ``file`` and the entry's key path (``messages[2].labels.x``) for anything wrong.

    Used for discovered message files and for registrations over HTTP, which are checked
    exactly like the config's own ``messages``.
    """
    reader = Reader(file)
    specs = reader.messages(document, key)
    if reader.errors:
        raise errors.ConfigErrors(reader.errors)
    return specs


def parse_message(
    document: object, where: str, extra: frozenset[str] = frozenset()
) -> tuple[MessageSpec, dict[str, Any]]:
    """One ``{id, labels, sent_at}`` object (a registration), checked like the config's
    ``messages`` entries, and the ``extra`` keys it had; ``ConfigErrors`` naming ``where``."""
    reader = Reader(where)
    spec = reader.message(document, "", extra)
    if spec is None or reader.errors:
        raise errors.ConfigErrors(reader.errors or [errors.ConfigError(where, "", "not valid")])
    assert isinstance(document, dict)
    return spec, {k: v for k, v in document.items() if k in extra}


class Reader:
    """Collects every problem of one file, as ``file: key.path: problem`` errors."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[errors.ConfigError] = []
        self._label_sets: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}

    def fail(self, kind: type[errors.ConfigError], key: str, problem: str) -> None:
        self.errors.append(kind(self.file, key, problem))

    # -- generic readers -------------------------------------------------
    def mapping(self, value: object, key: str, allowed: frozenset[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(errors.InvalidTypeError, key, f"must be a mapping, not {kind(value)}")
            return {}
        for name in value:
            if name not in allowed:
                self.fail(errors.UnknownKeyError, join(key, str(name)), self.unknown(name, allowed))
        return {k: v for k, v in value.items() if k in allowed}

    def unknown(self, name: object, allowed: frozenset[str]) -> str:
        """The problem with a key not in ``allowed``."""
        return convert.unknown(name, allowed)

    def field(
        self,
        section: Mapping[str, Any],
        name: str,
        key: str,
        default: T,
        check: Callable[[Any], T],
    ) -> T:
        if name not in section:
            return default
        try:
            return check(section[name])
        except convert.NotADuration as e:
            self.fail(errors.InvalidDurationError, join(key, name), str(e))
        except (TypeError, ValueError) as e:
            self.fail(errors.InvalidValueError, join(key, name), str(e))
        return default

    # -- sections --------------------------------------------------------
    def messages(self, value: object, name: str = "messages") -> tuple[MessageSpec, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(errors.InvalidTypeError, name, f"must be a list, not {kind(value)}")
            return ()
        specs: list[MessageSpec] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            key = f"{name}[{i}]"
            spec = self.message(item, key)
            if spec is None:
                continue
            if spec.id in seen:
                self.fail(
                    errors.DuplicateMessageError,
                    join(key, "id"),
                    f"message {spec.id!r} is already listed at {name}[{seen[spec.id]}]",
                )
                continue
            seen[spec.id] = i
            specs.append(spec)
        return tuple(specs)

    def message(
        self, item: object, key: str, extra: frozenset[str] = frozenset()
    ) -> MessageSpec | None:
        """One ``{id, labels, sent_at, scheduled_at, transactional}`` entry; None if it has no
        valid ID (errors say why; one with a valid ID and a bad label comes back without that
        label, and an error)."""
        entry = self.mapping(item, key, _MESSAGE_KEYS | extra)
        if "id" not in entry:
            if isinstance(item, dict):
                self.fail(errors.MissingKeyError, join(key, "id"), "is required")
            return None
        message_id = self.field(entry, "id", key, "", convert.message_id)
        labels = self.labels(entry.get("labels"), join(key, "labels"))
        sent_at = self.field(entry, "sent_at", key, None, convert.timestamp)
        scheduled_at = self.field(entry, "scheduled_at", key, None, convert.timestamp)
        transactional = self.field(entry, "transactional", key, False, convert.boolean)
        if not message_id:
            return None
        return MessageSpec(message_id, labels, sent_at, scheduled_at, transactional)

    def globs(self, value: object, key: str) -> tuple[str, ...]:
        """File globs (``message_files``); relative ones from the config file's folder."""
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(errors.InvalidTypeError, key, "must be a list of file globs")
            return ()
        # Kept as written: relative ones are globbed from the config file's folder, which is
        # not joined in here so that glob characters in its name stay literal.
        return tuple(value)

    def labels(self, value: object, key: str) -> Mapping[str, str]:
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, dict):
            self.fail(errors.InvalidTypeError, key, f"must be a mapping, not {kind(value)}")
            return MappingProxyType({})
        if len(value) > MAX_LABELS:
            self.fail(
                errors.InvalidValueError,
                key,
                f"has {len(value)} labels; a message takes at most {MAX_LABELS}",
            )
            return MappingProxyType({})
        labels: dict[str, str] = {}
        for name, label_value in value.items():
            where = join(key, str(name)[:64])
            if problem := label_name_problem(name):
                self.fail(errors.LabelNameError, where, problem)
                continue
            try:
                labels[name] = convert.label_value(label_value)
            except TypeError as e:
                self.fail(errors.InvalidTypeError, where, str(e))
            except ValueError as e:
                self.fail(errors.InvalidValueError, where, str(e))
        # Messages of one campaign share one label mapping: 30,000 of them cost one dict.
        pairs = tuple(sorted(labels.items()))
        shared = self._label_sets.get(pairs)
        if shared is None:
            shared = self._label_sets[pairs] = MappingProxyType(dict(pairs))
        return shared


def label_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a message label (None if it can)."""
    if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
        return "is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
    if len(name) > MAX_LABEL_NAME:
        return f"is {len(name)} characters long; label names take at most {MAX_LABEL_NAME}"
    if name.startswith("__"):
        return "names starting with __ are reserved"
    if name in RESERVED_LABELS:
        return "shadows a label the exporter or Prometheus sets itself; choose another name"
    return None
