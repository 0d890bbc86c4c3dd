"""YAML file -> ``Config``, collecting every problem rather than stopping at the first."""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from exporter.config import errors
from exporter.config.duration import parse_duration
from exporter.config.model import (
    DEFAULT_STATE_PATH,
    DEFAULT_STATUSES,
    ApiConfig,
    Config,
    MessageSpec,
    PollingConfig,
    ScheduleStep,
    SourceConfig,
    State,
    StatusMap,
)
from exporter.secret import Redactor, Secret
from exporter.shard import check_index, parse_count, parse_index

API_KEY_ENV = "MAILPARTNER_API_KEY"
UPSTREAM_RATE_LIMIT = 2000
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
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MESSAGE_ID = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")
# Parts of SPEC §4 that later releases bring; named so the error says so.
_TOP_KEYS = frozenset(
    {"api", "polling", "status_map", "messages", "message_files", "state", "shard", "sources"}
)

T = TypeVar("T")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate ``path``; raise ``ConfigErrors`` listing every problem."""
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as e:
        raise errors.ConfigErrors(
            [errors.ConfigError(file, "", f"cannot read: {e.strerror}")]
        ) from None
    return parse_config(text, file, os.environ if environ is None else environ)


def parse_config(text: str, file: str, environ: Mapping[str, str]) -> Config:
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        # Only the problem and the position: PyYAML's full text quotes the file's lines.
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise errors.ConfigErrors(
            [errors.SyntaxConfigError(file, "", f"{where}{problem}")]
        ) from None
    reader = _Reader(file, environ)
    config = reader.config({} if document is None else document)
    if reader.errors:
        # A value quoted in a problem might be a key, typed where it does not belong.
        keys = [config.api.api_key]
        for source in config.sources or ():
            keys += [v.api_key for v in source.settings.values() if isinstance(v, ApiConfig)]
        redact = Redactor(*keys)
        raise errors.ConfigErrors(
            [type(e)(e.file, e.key, redact(e.problem)) for e in reader.errors]
        )
    return config


def parse_messages(document: object, file: str, key: str = "messages") -> tuple[MessageSpec, ...]:
    """A ``messages`` list (as in the config) read from ``document``; ``ConfigErrors`` naming
    ``file`` and the entry's key path (``messages[2].labels.x``) for anything wrong.

    Used for discovered message files and for registrations over HTTP, which are checked
    exactly like the config's own ``messages``.
    """
    reader = _Reader(file, {})
    specs = reader.messages(document, key)
    if reader.errors:
        raise errors.ConfigErrors(reader.errors)
    return specs


def parse_message(
    document: object, where: str, extra: frozenset[str] = frozenset()
) -> tuple[MessageSpec, dict[str, Any]]:
    """One ``{id, labels, sent_at}`` object (a registration), checked like the config's
    ``messages`` entries, and the ``extra`` keys it had; ``ConfigErrors`` naming ``where``."""
    reader = _Reader(where, {})
    spec = reader.message(document, "", extra)
    if spec is None or reader.errors:
        raise errors.ConfigErrors(reader.errors or [errors.ConfigError(where, "", "not valid")])
    assert isinstance(document, dict)
    return spec, {k: v for k, v in document.items() if k in extra}


class _Reader:
    def __init__(self, file: str, environ: Mapping[str, str]) -> None:
        self.file = file
        self.environ = environ
        self.errors: list[errors.ConfigError] = []
        self.warnings: list[str] = []

    def fail(self, kind: type[errors.ConfigError], key: str, problem: str) -> None:
        self.errors.append(kind(self.file, key, problem))

    # -- generic readers -------------------------------------------------
    def mapping(self, value: object, key: str, allowed: frozenset[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(errors.InvalidTypeError, key, f"must be a mapping, not {_kind(value)}")
            return {}
        for name in value:
            if name not in allowed:
                self.fail(errors.UnknownKeyError, _join(key, str(name)), _unknown(name, allowed))
        return {k: v for k, v in value.items() if k in allowed}

    def field(
        self,
        section: Mapping[str, Any],
        name: str,
        key: str,
        default: T,
        convert: Callable[[Any], T],
    ) -> T:
        if name not in section:
            return default
        try:
            return convert(section[name])
        except _NotADuration as e:
            self.fail(errors.InvalidDurationError, _join(key, name), str(e))
        except (TypeError, ValueError) as e:
            self.fail(errors.InvalidValueError, _join(key, name), str(e))
        return default

    # -- sections --------------------------------------------------------
    def config(self, document: object) -> Config:
        top = self.mapping(document, "", _TOP_KEYS)
        api = self.api(top.get("api"))
        polling = self.polling(top.get("polling"))
        status_map = self.status_map(top.get("status_map"))
        messages = self.messages(top.get("messages"))
        message_files = self.globs(top.get("message_files"), "message_files")
        sources = self.sources(top.get("sources"))
        state = self.mapping(top.get("state"), "state", frozenset({"path"}))
        state_path = self.field(state, "path", "state", DEFAULT_STATE_PATH, _path)
        shard_count, shard_index = self.shard(top.get("shard"))
        return Config(
            self.file,
            api,
            polling,
            status_map,
            messages,
            tuple(self.warnings),
            state_path,
            shard_count,
            shard_index,
            message_files,
            sources,
        )

    def api(
        self,
        value: object,
        key: str = "api",
        d: ApiConfig = ApiConfig(),  # noqa: B008 - frozen
        env: str = API_KEY_ENV,
        upstream: str = "Mail Partner",
    ) -> ApiConfig:
        """An ``api`` section: Mail Partner's at the top, or a source's for another API."""
        keys = frozenset(
            {
                "base_url",
                "api_key",
                "api_key_file",
                "timeout",
                "max_requests_per_minute",
                "concurrency",
                "format",
                "max_response_size",
            }
        )
        section = self.mapping(value, key, keys)
        rate = self.field(
            section, "max_requests_per_minute", key, d.max_requests_per_minute, _positive_int
        )
        if rate > UPSTREAM_RATE_LIMIT:
            self.warnings.append(
                f"{self.file}: {key}.max_requests_per_minute: {rate} is above {upstream}'s limit"
                f" of {UPSTREAM_RATE_LIMIT} requests per minute per IP; expect HTTP 429"
            )
        return ApiConfig(
            base_url=self.field(section, "base_url", key, d.base_url, _base_url),
            api_key=self.api_key(section, key, env),
            timeout=self.field(section, "timeout", key, d.timeout, _positive_duration),
            max_requests_per_minute=rate,
            concurrency=self.field(section, "concurrency", key, d.concurrency, _positive_int),
            format=self.field(section, "format", key, d.format, _choice("json", "xml")),
            max_response_bytes=self.field(
                section, "max_response_size", key, d.max_response_bytes, _byte_size
            ),
        )

    def api_key(
        self, section: Mapping[str, Any], key: str = "api", env: str = API_KEY_ENV
    ) -> Secret | None:
        if "api_key" in section and "api_key_file" in section:
            self.fail(
                errors.InvalidValueError,
                f"{key}.api_key",
                f"set either {key}.api_key or {key}.api_key_file, not both",
            )
            return None
        if "api_key_file" in section:
            return self.api_key_file(section["api_key_file"], f"{key}.api_key_file")
        if "api_key" in section:
            return self.api_key_value(section["api_key"], f"{key}.api_key")
        if self.environ.get(env):
            return Secret(self.environ[env].strip())
        return None

    def api_key_value(self, raw: object, key: str) -> Secret | None:
        """``api.api_key``, with each ``${VAR}`` replaced from the environment."""
        if not isinstance(raw, str):
            self.fail(errors.InvalidTypeError, key, f"must be a string, not {_kind(raw)}")
            return None
        unset = [name for name in _ENV_REF.findall(raw) if name not in self.environ]
        if unset:
            self.fail(errors.SecretError, key, f"environment variable {unset[0]} is not set")
            return None
        return self.non_empty_key(_ENV_REF.sub(lambda m: self.environ[m[1]], raw), key)

    def api_key_file(self, raw: object, key: str) -> Secret | None:
        if not isinstance(raw, str) or not raw:
            self.fail(errors.InvalidTypeError, key, "must be a file path")
            return None
        # Like Prometheus, a relative path is relative to the config file.
        path = Path(self.file).parent / raw
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            self.fail(errors.SecretError, key, f"cannot read {raw}: {e.strerror}")
            return None
        return self.non_empty_key(text.strip(), key)

    def non_empty_key(self, value: str, key: str) -> Secret | None:
        if not value.strip():
            self.fail(errors.SecretError, key, "the API key is empty")
            return None
        return Secret(value.strip())

    def shard(self, value: object) -> tuple[int, int]:
        """``shard.count`` and ``shard.index`` (an integer, or ``auto``: the pod ordinal)."""
        before = len(self.errors)
        section = self.mapping(value, "shard", frozenset({"count", "index"}))
        count = self.field(section, "count", "shard", 1, parse_count)
        index = self.field(section, "index", "shard", 0, self.shard_index)
        if len(self.errors) > before:
            return 1, 0  # one problem is enough: the index is not compared with a bad count
        try:
            check_index(index, count, "shard.count")
        except ValueError as e:
            self.fail(errors.InvalidValueError, "shard.index", str(e))
            return 1, 0
        return count, index

    def shard_index(self, value: object) -> int:
        return parse_index(value, self.environ)

    def polling(self, value: object) -> PollingConfig:
        keys = frozenset({"schedule", "settled_recheck", "final_after", "retention"})
        section = self.mapping(value, "polling", keys)
        d = PollingConfig()
        polling = PollingConfig(
            schedule=self.schedule(section["schedule"]) if "schedule" in section else d.schedule,
            settled_recheck=self.field(
                section, "settled_recheck", "polling", d.settled_recheck, _positive_duration
            ),
            final_after=self.field(
                section, "final_after", "polling", d.final_after, _positive_duration
            ),
            retention=self.field(section, "retention", "polling", d.retention, _duration),
        )
        if polling.schedule and polling.final_after < polling.schedule[-1].until:
            self.fail(
                errors.InvalidValueError,
                "polling.final_after",
                "is before the last schedule step's until; that step would never run",
            )
        return polling

    def schedule(self, value: object) -> tuple[ScheduleStep, ...]:
        if not isinstance(value, list) or not value:
            self.fail(
                errors.InvalidTypeError,
                "polling.schedule",
                "must be a non-empty list of {until, every}",
            )
            return PollingConfig().schedule
        steps: list[ScheduleStep] = []
        for i, item in enumerate(value):
            key = f"polling.schedule[{i}]"
            step = self.mapping(item, key, frozenset({"until", "every"}))
            for name in ("until", "every"):
                if name not in step:
                    self.fail(errors.MissingKeyError, _join(key, name), "is required")
            until = self.field(step, "until", key, 0.0, _positive_duration)
            every = self.field(step, "every", key, 0.0, _positive_duration)
            if steps and until and until <= steps[-1].until:
                self.fail(
                    errors.ScheduleOrderError,
                    _join(key, "until"),
                    "must be greater than the previous step's until",
                )
            steps.append(ScheduleStep(until, every))
        return tuple(steps)

    def status_map(self, value: object) -> StatusMap:
        section = self.mapping(value, "status_map", frozenset(s.value for s in State))
        lists = dict(DEFAULT_STATUSES)
        for state in State:
            raws = section.get(state.value)
            if state.value not in section:
                continue
            if not isinstance(raws, list) or not all(isinstance(r, str) and r for r in raws):
                self.fail(
                    errors.InvalidTypeError,
                    f"status_map.{state.value}",
                    "must be a list of status strings",
                )
                continue
            lists[state] = tuple(raws)
        # Claims made in the file come first, so a clash with a default list is
        # reported at the key the operator wrote.
        owner: dict[str, State] = {}
        for state in sorted(lists, key=lambda st: st.value not in section):
            for raw in lists[state]:
                first = owner.setdefault(raw.lower(), state)
                if first == state:
                    continue
                if state.value in section:
                    self.fail(
                        errors.InvalidValueError,
                        f"status_map.{state.value}",
                        f"status {raw!r} is already mapped to {first.value}",
                    )
                else:
                    self.fail(
                        errors.InvalidValueError,
                        f"status_map.{first.value}",
                        f"status {raw!r} is also in the default list of {state.value}; "
                        f"set status_map.{state.value} without it",
                    )
        return StatusMap.from_lists(lists)

    def messages(self, value: object, name: str = "messages") -> tuple[MessageSpec, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(errors.InvalidTypeError, name, f"must be a list, not {_kind(value)}")
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
                    _join(key, "id"),
                    f"message {spec.id!r} is already listed at {name}[{seen[spec.id]}]",
                )
                continue
            seen[spec.id] = i
            specs.append(spec)
        return tuple(specs)

    def message(
        self, item: object, key: str, extra: frozenset[str] = frozenset()
    ) -> MessageSpec | None:
        """One ``{id, labels, sent_at}`` entry; None if it has no valid ID (errors say why;
        one with a valid ID and a bad label comes back without that label, and an error)."""
        entry = self.mapping(item, key, frozenset({"id", "labels", "sent_at"}) | extra)
        if "id" not in entry:
            if isinstance(item, dict):
                self.fail(errors.MissingKeyError, _join(key, "id"), "is required")
            return None
        message_id = self.field(entry, "id", key, "", _message_id)
        labels = self.labels(entry.get("labels"), _join(key, "labels"))
        sent_at = self.field(entry, "sent_at", key, None, _timestamp)
        if not message_id:
            return None
        return MessageSpec(id=message_id, labels=labels, sent_at=sent_at)

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

    def sources(self, value: object) -> tuple[SourceConfig, ...]:
        """``sources``: each enabled source's class and checked settings; bulk_status is on
        unless ``enabled: false``."""
        from exporter.config.options import Options  # noqa: PLC0415 - options reads this module
        from exporter.sources.registry import available  # noqa: PLC0415 - sources read config

        if value is not None and not isinstance(value, dict):
            self.fail(errors.InvalidTypeError, "sources", f"must be a mapping, not {_kind(value)}")
            value = None
        section: dict[Any, Any] = {"bulk_status": {}, **(value or {})}
        kinds = available()
        enabled: list[SourceConfig] = []
        for name, raw in section.items():
            key = _join("sources", str(name))
            kind = kinds.get(str(name))
            if kind is None:
                close = difflib.get_close_matches(str(name), sorted(kinds), n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                self.fail(
                    errors.UnknownKeyError,
                    key,
                    f"unknown source ({hint}installed: {', '.join(sorted(kinds))})",
                )
                continue
            if isinstance(kind, Exception):
                self.fail(errors.InvalidValueError, key, f"its plugin cannot be loaded: {kind}")
                continue
            if raw is not None and not isinstance(raw, dict):
                self.fail(errors.InvalidTypeError, key, f"must be a mapping, not {_kind(raw)}")
                continue
            options = dict(raw or {})
            on = self.field(options, "enabled", key, True, _boolean)
            options.pop("enabled", None)
            reader = Options(self, key, options)
            try:
                settings = kind.configure(reader)
            except Exception as e:  # a plugin's bug is a config error, not a crash
                self.fail(errors.InvalidValueError, key, f"its plugin failed: {_describe(e)}")
                continue
            reader.finish()
            if on:
                enabled.append(SourceConfig(str(name), kind, MappingProxyType(dict(settings))))
        return tuple(enabled)

    def labels(self, value: object, key: str) -> Mapping[str, str]:
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, dict):
            self.fail(errors.InvalidTypeError, key, f"must be a mapping, not {_kind(value)}")
            return MappingProxyType({})
        labels: dict[str, str] = {}
        for name, label_value in value.items():
            where = _join(key, str(name))
            if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
                self.fail(
                    errors.LabelNameError,
                    where,
                    "is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)",
                )
            elif name.startswith("__"):
                self.fail(errors.LabelNameError, where, "names starting with __ are reserved")
            elif name in RESERVED_LABELS:
                self.fail(
                    errors.LabelNameError,
                    where,
                    "shadows a label the exporter or Prometheus sets itself; choose another name",
                )
            elif isinstance(label_value, dict | list) or label_value is None:
                self.fail(errors.InvalidTypeError, where, "label values must be scalars")
            else:
                labels[name] = (
                    str(label_value).lower() if isinstance(label_value, bool) else str(label_value)
                )
        return MappingProxyType(dict(sorted(labels.items())))


# -- converters: raise ValueError/TypeError with the problem ------------------
def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "empty"}.get(
        type(value), type(value).__name__
    )


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


class _NotADuration(ValueError):
    pass


def _unknown(name: object, allowed: frozenset[str]) -> str:
    close = difflib.get_close_matches(str(name), sorted(allowed), n=1)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, not {_kind(value)}")
    return value


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _duration(value: object) -> float:
    if not isinstance(value, str):
        raise _NotADuration(f"must be a duration such as 30s or 2h, not {_kind(value)}")
    try:
        return parse_duration(value)
    except ValueError as e:
        raise _NotADuration(str(e)) from None


def _positive_duration(value: object) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


_SIZE = re.compile(r"(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)")
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}


def _byte_size(value: object) -> int:
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a size such as 256MiB or 64MB")
    size = int(match[1]) * _SIZE_UNITS[match[2]]
    if size < 1024:
        raise ValueError("must be at least 1KiB")
    return size


def _path(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("must be a file path, or :memory: to keep no state")
    return value


def _positive_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"must be an integer, not {_kind(value)}")
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _choice(*allowed: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return str(value)

    return convert


def _base_url(value: object) -> str:
    if not isinstance(value, str) or not re.match(r"https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


def _message_id(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"must be a string, not {_kind(value)}")
    text = str(value)
    if not _MESSAGE_ID.fullmatch(text):
        raise ValueError("must be 1 to 128 characters without spaces or control characters")
    return text


def _timestamp(value: object) -> float:
    if isinstance(value, bool):
        raise TypeError("must be a time such as 2026-11-26T10:00:00Z")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an RFC 3339 time such as 2026-11-26T10:00:00Z"
            ) from None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    raise TypeError(f"must be a time such as 2026-11-26T10:00:00Z, not {_kind(value)}")
