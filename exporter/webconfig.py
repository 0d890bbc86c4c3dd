"""``--web.config.file``: TLS, basic auth and headers, in exporter-toolkit's ``web-config.yml``.

The format is the one documented in exporter-toolkit's ``docs/web-configuration.md``. Where
Python cannot do what Go does, this module refuses or tightens, never opens access:

- ``cipher_suites``, ``curve_preferences`` and ``prefer_server_cipher_suites`` are checked and
  then ignored (OpenSSL's defaults apply); ``http2`` is ignored (the server speaks HTTP/1.x).
- Inline ``cert``/``key``/``client_ca``, ``client_allowed_sans`` and ``rate_limit`` are
  refused as not supported, rather than silently dropped.
- Python's ssl module verifies every client certificate it asks for: ``RequireAnyClientCert``
  and ``VerifyClientCertIfGiven`` verify against ``client_ca_file`` (so they need it), and
  ``RequestClientCert``, whose certificate nothing would look at, asks for none.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import ssl
import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from exporter.config import errors
from exporter.config.convert import load_yaml
from exporter.config.reader import Reader

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireClientCert": ssl.CERT_REQUIRED,  # exporter-toolkit's old name for the above
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# The headers exporter-toolkit lets a web config set, with their allowed values (any if empty).
HEADERS: Mapping[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
log = logging.getLogger(__name__)
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_MIN, _MAX = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
_FILES = ("cert_file", "key_file", "client_ca_file")
_IGNORED = frozenset({"cipher_suites", "curve_preferences", "prefer_server_cipher_suites"})
_UNSUPPORTED = frozenset({"cert", "key", "client_ca", "client_allowed_sans", "rate_limit"})
_TOP = frozenset({"tls_server_config", "http_server_config", "basic_auth_users"})
_TLS = frozenset({*_FILES, "client_auth_type", "min_version", "max_version", *_IGNORED})
_HTTP = frozenset({"http2", "headers"})


@dataclasses.dataclass(frozen=True)
class TLSServerConfig:
    """``tls_server_config``; relative paths are already joined to the web config's folder."""

    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: ssl.TLSVersion = _MIN
    max_version: ssl.TLSVersion = _MAX

    @property
    def files(self) -> tuple[Path, ...]:
        ca = (self.client_ca_file,) if self.client_ca_file else ()
        return (self.cert_file, self.key_file, *ca)


@dataclasses.dataclass(frozen=True)
class WebConfig:
    """One good reading of the web config file, with the TLS context built from it."""

    file: str
    tls: TLSServerConfig | None = None
    basic_auth_users: Mapping[str, bytes] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    headers: tuple[tuple[str, str], ...] = ()
    ssl_context: ssl.SSLContext | None = dataclasses.field(default=None, compare=False)


def load_web_config(path: str) -> WebConfig:
    """Read ``path``, check it and load its certificates; ``ConfigErrors`` lists every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problem = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise errors.ConfigErrors([errors.ConfigError(path, "", f"cannot read: {problem}")]) from e
    document = load_yaml(text, path)
    reader = _Reader(path)
    config = reader.web_config(document)
    if config.tls is not None and not reader.errors:
        config = dataclasses.replace(config, ssl_context=reader.ssl_context(config.tls))
    if reader.errors:
        raise errors.ConfigErrors(reader.errors)
    return config


class WebConfigWatcher:
    """The last good web config, re-read when its file or a file it names changes.

    exporter-toolkit reads the file on every request; one ``os.stat`` per file is the cheap
    way to notice a change. A broken new file is logged and the last good config kept, and so
    is one that would open access a restart has not asked for (see ``_needs_restart``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._config = load_web_config(path)
        self._seen = self._signature()

    def current(self) -> WebConfig:
        with self._lock:
            seen = self._signature()
            if seen != self._seen:
                self._seen = seen  # a broken file is reported once, not on every request
                self._reload()
            return self._config

    def _reload(self) -> None:
        try:
            config = load_web_config(self.path)
            refused = _needs_restart(self._config, config)
            if refused:
                raise errors.ConfigErrors(refused)
        except errors.ConfigErrors as e:
            for error in e.errors:
                log.error(
                    "web config not reloaded, keeping the last good one", extra={"err": str(error)}
                )
            return
        self._config = config
        log.info("web config reloaded", extra={"file": self.path})

    def _signature(self) -> tuple[tuple[int, ...] | None, ...]:
        tls = self._config.tls
        return tuple(_file_version(path) for path in (Path(self.path), *(tls.files if tls else ())))


def _needs_restart(old: WebConfig, new: WebConfig) -> list[errors.ConfigError]:
    """What a reload may not change. TLS on or off changes the server itself. Basic auth off
    opens every path: a file emptied or cut short while being edited must not do that, so
    it takes a restart, which shows it was meant. Users may change, and auth may come on."""
    refused = []
    if (new.tls is None) != (old.tls is None):
        problem = "turning TLS on or off needs a restart"
        refused.append(errors.ConfigError(new.file, "tls_server_config", problem))
    if old.basic_auth_users and not new.basic_auth_users:
        problem = "turning basic auth off (no users left) needs a restart"
        refused.append(errors.ConfigError(new.file, "basic_auth_users", problem))
    return refused


def _file_version(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _Reader(Reader):
    """Collects every problem of one file, like the config loader does."""

    def unknown(self, name: object, allowed: frozenset[str]) -> str:
        # Keys exporter-toolkit has and this exporter refuses: say so, not "unknown key".
        if name in _UNSUPPORTED:
            return "not supported by this exporter"
        return super().unknown(name, allowed)

    def text(self, section: Mapping[str, Any], key: str, choices: Collection[str] = ()) -> str:
        value = section.get(key.rpartition(".")[2])
        if value is None:
            return ""
        if not isinstance(value, str):
            self.fail(errors.InvalidTypeError, key, f"must be a string, not {type(value).__name__}")
        elif choices and value not in choices:
            self.fail(
                errors.InvalidValueError, key, f"{value!r} is not one of {', '.join(choices)}"
            )
        else:
            return value
        return ""

    def web_config(self, document: object) -> WebConfig:
        top = self.mapping(document, "", _TOP)
        tls = self.tls(self.mapping(top.get("tls_server_config"), "tls_server_config", _TLS))
        http = self.mapping(top.get("http_server_config"), "http_server_config", _HTTP)
        if not isinstance(http.get("http2", True), bool):
            self.fail(errors.InvalidTypeError, "http_server_config.http2", "must be true or false")
        headers = self.headers(http.get("headers"))
        return WebConfig(self.file, tls, self.users(top.get("basic_auth_users")), headers)

    def tls(self, section: dict[str, Any]) -> TLSServerConfig | None:
        if not section:
            return None
        for name in sorted(_IGNORED & section.keys()):
            kind = bool if name == "prefer_server_cipher_suites" else list
            if not isinstance(section[name], kind):
                self.fail(
                    errors.InvalidTypeError,
                    f"tls_server_config.{name}",
                    f"must be a {kind.__name__}",
                )
        cert, private_key, ca = (self.file_path(section, name) for name in _FILES)
        auth = self.text(section, "tls_server_config.client_auth_type", CLIENT_AUTH_TYPES)
        auth = auth or "NoClientCert"
        if ca is not None and CLIENT_AUTH_TYPES[auth] == ssl.CERT_NONE:
            problem = f"set client_auth_type too: {auth} asks for no client certificate"
            self.fail(errors.InvalidValueError, "tls_server_config.client_ca_file", problem)
        if ca is None and CLIENT_AUTH_TYPES[auth] != ssl.CERT_NONE:
            problem = f"required with client_auth_type {auth}"
            self.fail(errors.MissingKeyError, "tls_server_config.client_ca_file", problem)
        low, high = (
            TLS_VERSIONS.get(self.text(section, f"tls_server_config.{name}", TLS_VERSIONS), default)
            for name, default in (("min_version", _MIN), ("max_version", _MAX))
        )
        if low > high:
            self.fail(
                errors.InvalidValueError, "tls_server_config.min_version", "above max_version"
            )
        if cert is None or private_key is None:
            return None
        return TLSServerConfig(cert, private_key, auth, ca, low, high)

    def file_path(self, section: Mapping[str, Any], name: str) -> Path | None:
        key = f"tls_server_config.{name}"
        value = self.text(section, key)
        if not value and name != "client_ca_file" and name not in section:
            self.fail(errors.MissingKeyError, key, "required when tls_server_config is set")
        # Relative to the web config's folder, as exporter-toolkit does; absolute stays absolute.
        return Path(self.file).parent / value if value else None

    def users(self, value: object) -> Mapping[str, bytes]:
        users: dict[str, bytes] = {}
        if not isinstance(value, dict | None):
            self.fail(
                errors.InvalidTypeError, "basic_auth_users", "must be a mapping of user: hash"
            )
        for user, hashed in (value if isinstance(value, dict) else {}).items():
            key = f"basic_auth_users.{user}"
            if not isinstance(user, str) or not user or ":" in user:
                self.fail(errors.InvalidValueError, key, "user names are strings without ':'")
            elif not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
                # Never echo the value: it is meant to be a secret, even when malformed.
                self.fail(errors.InvalidValueError, key, "not a bcrypt hash ($2y$10$...)")
            else:
                users[user] = hashed.encode()
        return MappingProxyType(users)

    def headers(self, value: object) -> tuple[tuple[str, str], ...]:
        key = "http_server_config.headers"
        headers = self.mapping(value, key, frozenset(HEADERS))
        for name, text in headers.items():
            allowed = HEADERS[name]
            if not isinstance(text, str) or (allowed and text not in allowed):
                expected = " or ".join(allowed) if allowed else "a string"
                self.fail(errors.InvalidValueError, f"{key}.{name}", f"must be {expected}")
        # A blank value leaves the header unset, as in exporter-toolkit.
        return tuple((k, v) for k, v in headers.items() if v and isinstance(v, str))

    def ssl_context(self, tls: TLSServerConfig) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version, context.maximum_version = tls.min_version, tls.max_version
        context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
        for name, path in zip(_FILES, tls.files, strict=False):
            try:
                path.open("rb").close()
            except OSError as e:
                problem = f"cannot read {path}: {e.strerror}"
                self.fail(errors.InvalidValueError, f"tls_server_config.{name}", problem)
        if self.errors:
            return context
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
        except (ssl.SSLError, ValueError) as e:
            problem = f"with key_file, not a PEM certificate and its unencrypted key ({_why(e)})"
            self.fail(errors.InvalidValueError, "tls_server_config.cert_file", problem)
        if tls.client_ca_file is not None:
            try:
                context.load_verify_locations(tls.client_ca_file)
            except ssl.SSLError as e:
                problem = f"no PEM CA certificate in {tls.client_ca_file} ({_why(e)})"
                self.fail(errors.InvalidValueError, "tls_server_config.client_ca_file", problem)
        return context


def _no_password() -> bytes:
    # Without this callback OpenSSL would prompt on the terminal and hang the reload.
    raise ValueError("the key is encrypted")


def _why(e: Exception) -> str:
    return str(getattr(e, "reason", None) or e)
