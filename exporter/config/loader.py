"""YAML file -> ``Config``, collecting every problem rather than stopping at the first."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from exporter.config import convert, errors
from exporter.config.convert import join, kind
from exporter.config.model import (
    DEFAULT_STATE_PATH,
    ApiConfig,
    Config,
    SourceConfig,
    SourceKind,
)
from exporter.config.options import Options
from exporter.config.sections import SectionReader
from exporter.secret import Redactor, Secret
from exporter.shard import (
    NO_SHARD_FLAGS,
    Shard,
    ShardFlags,
    check_index,
    parse_count,
    parse_index,
    parse_peer_url,
)

API_KEY_ENV = "MAILPARTNER_API_KEY"
UPSTREAM_RATE_LIMIT = 2000
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Parts of SPEC §4 that later releases bring; named so the error says so.
_TOP_KEYS = frozenset(
    {
        "api",
        "polling",
        "status_map",
        "messages",
        "message_files",
        "state",
        "shard",
        "sources",
        "metrics",
    }
)

T = TypeVar("T")


# The sections every config has, whatever sources are installed: bulk_status is on unless
# ``enabled: false``.
DEFAULT_SOURCES: Mapping[str, Any] = MappingProxyType({"bulk_status": {}})
# What errors about flags name instead of a file.
COMMAND_LINE = "command line"
# Source kinds by name; a plugin that failed to load maps to why (reported if configured).
Kinds = Mapping[str, SourceKind | Exception]


def load_config(
    path: str | os.PathLike[str],
    kinds: Kinds,
    environ: Mapping[str, str] | None = None,
    shard_flags: ShardFlags = NO_SHARD_FLAGS,
) -> Config:
    """Read and validate ``path``; raise ``ConfigErrors`` listing every problem.

    ``kinds`` are the sources that may be configured (``exporter.sources.registry``);
    ``shard_flags`` (``--shard.count``/``--shard.index``, when given) beat the file's ``shard``.
    """
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as e:
        raise errors.ConfigErrors(
            [errors.ConfigError(file, "", f"cannot read: {e.strerror}")]
        ) from None
    return parse_config(text, file, kinds, os.environ if environ is None else environ, shard_flags)


def parse_config(
    text: str,
    file: str,
    kinds: Kinds,
    environ: Mapping[str, str],
    shard_flags: ShardFlags = NO_SHARD_FLAGS,
) -> Config:
    document = convert.load_yaml(text, file)
    reader = ConfigReader(file, environ)
    config = reader.config({} if document is None else document, kinds, shard_flags)
    if reader.errors:
        # A value quoted in a problem might be a key, typed where it does not belong.
        redact = Redactor(*api_keys(config))
        raise errors.ConfigErrors(
            [type(e)(e.file, e.key, redact(e.problem)) for e in reader.errors]
        )
    return config


def api_keys(config: Config) -> list[Secret | None]:
    """Every API key in ``config``: Mail Partner's and any source's own."""
    keys = [config.api.api_key]
    for source in config.sources or ():
        keys += [v.api_key for v in source.settings.values() if isinstance(v, ApiConfig)]
    return keys


class ConfigReader(SectionReader):
    def __init__(self, file: str, environ: Mapping[str, str]) -> None:
        super().__init__(file)
        self.environ = environ
        self.warnings: list[str] = []

    def config(self, document: object, kinds: Kinds, shard_flags: ShardFlags) -> Config:
        top = self.mapping(document, "", _TOP_KEYS)
        api = self.api(top.get("api"))
        polling = self.polling(top.get("polling"))
        status_map = self.status_map(top.get("status_map"))
        messages = self.messages(top.get("messages"))
        message_files = self.globs(top.get("message_files"), "message_files")
        sources = self.sources(top.get("sources"), kinds)
        state = self.mapping(top.get("state"), "state", frozenset({"path"}))
        state_path = self.field(state, "path", "state", DEFAULT_STATE_PATH, convert.path)
        shard = self.shard(top.get("shard"), shard_flags)
        metrics = self.metrics(top.get("metrics"))
        return Config(
            self.file,
            api,
            polling,
            status_map,
            messages,
            tuple(self.warnings),
            state_path,
            shard.count,
            shard.index,
            message_files,
            sources,
            metrics,
            shard_peer_url=shard.peer_url,
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
            section, "max_requests_per_minute", key, d.max_requests_per_minute, convert.positive_int
        )
        if rate > UPSTREAM_RATE_LIMIT:
            self.warnings.append(
                f"{self.file}: {key}.max_requests_per_minute: {rate} is above {upstream}'s limit"
                f" of {UPSTREAM_RATE_LIMIT} requests per minute per IP; expect HTTP 429"
            )
        return ApiConfig(
            base_url=self.field(section, "base_url", key, d.base_url, convert.base_url),
            api_key=self.api_key(section, key, env),
            timeout=self.field(section, "timeout", key, d.timeout, convert.positive_duration),
            max_requests_per_minute=rate,
            concurrency=self.field(
                section, "concurrency", key, d.concurrency, convert.positive_int
            ),
            format=self.field(section, "format", key, d.format, convert.choice("json", "xml")),
            max_response_bytes=self.field(
                section, "max_response_size", key, d.max_response_bytes, convert.byte_size
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
            self.fail(errors.InvalidTypeError, key, f"must be a string, not {kind(raw)}")
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

    def shard(self, value: object, flags: ShardFlags) -> Shard:
        """``shard.count`` and ``shard.index`` (an integer, or ``auto``: the pod ordinal), each
        taken from its flag when one was given; errors name the flag or the key it came from.
        ``shard.peer_url`` is checked for every shard of the count (of one if that is bad)."""
        before = len(self.errors)
        section = self.mapping(value, "shard", frozenset({"count", "index", "peer_url"}))
        origins = {
            name: ("--shard." + name, flag) if flag is not None else (f"shard.{name}", None)
            for name, flag in (("count", flags.count), ("index", flags.index))
        }
        count = self.shard_setting(section, origins["count"], 1, parse_count)
        index = self.shard_setting(section, origins["index"], 0, self.shard_index)
        valid = len(self.errors) == before
        # One problem is enough: the index is not compared with a bad count.
        if valid:
            try:
                check_index(index, count, origins["count"][0])
            except ValueError as e:
                name, flag = origins["index"]
                self.errors.append(
                    errors.InvalidValueError(COMMAND_LINE if flag else self.file, name, str(e))
                )
                valid = False
        peers = count if valid else 1
        peer_url = self.field(
            section, "peer_url", "shard", None, lambda v: parse_peer_url(v, peers)
        )
        return Shard(count, index, peer_url) if valid else Shard.ALL

    def shard_setting(
        self,
        section: Mapping[str, Any],
        origin: tuple[str, str | None],
        default: int,
        parse: Callable[[object], int],
    ) -> int:
        name, flag = origin
        if flag is None:
            return self.field(section, name.partition(".")[2], "shard", default, parse)
        try:
            return parse(flag)
        except (TypeError, ValueError) as e:
            self.errors.append(errors.InvalidValueError(COMMAND_LINE, name, str(e)))
            return default

    def shard_index(self, value: object) -> int:
        return parse_index(value, self.environ)

    def sources(self, value: object, kinds: Kinds) -> tuple[SourceConfig, ...]:
        """``sources``: each enabled source's kind and checked settings."""
        if value is not None and not isinstance(value, dict):
            self.fail(errors.InvalidTypeError, "sources", f"must be a mapping, not {kind(value)}")
            value = None
        section: dict[Any, Any] = {**DEFAULT_SOURCES, **(value or {})}
        enabled: list[SourceConfig] = []
        for name, raw in section.items():
            key = join("sources", str(name))
            found = kinds.get(str(name))
            if found is None:
                close = difflib.get_close_matches(str(name), sorted(kinds), n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                self.fail(
                    errors.UnknownKeyError,
                    key,
                    f"unknown source ({hint}installed: {', '.join(sorted(kinds))})",
                )
                continue
            if isinstance(found, Exception):
                self.fail(errors.InvalidValueError, key, f"its plugin cannot be loaded: {found}")
                continue
            if raw is not None and not isinstance(raw, dict):
                self.fail(errors.InvalidTypeError, key, f"must be a mapping, not {kind(raw)}")
                continue
            options = dict(raw or {})
            on = self.field(options, "enabled", key, True, convert.boolean)
            options.pop("enabled", None)
            reader = Options(self, key, options)
            try:
                settings = found.configure(reader)
            except Exception as e:  # a plugin's bug is a config error, not a crash
                self.fail(
                    errors.InvalidValueError, key, f"its plugin failed: {convert.describe(e)}"
                )
                continue
            reader.finish()
            if on:
                enabled.append(SourceConfig(str(name), found, MappingProxyType(dict(settings))))
        return tuple(enabled)
