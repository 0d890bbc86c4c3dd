"""--web.config.file: TLS, mTLS, basic auth and reloads, over real loopback sockets."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import bcrypt
import pytest
import requests
import trustme

from exporter.config.errors import ConfigErrors
from exporter.web import BasicAuth, create_app, serve
from exporter.webconfig import WebConfigWatcher, load_web_config
from tests.scenario import scenario

USERS = "basic_auth_users:\n  prometheus: {hash}\n"
TLS = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
MTLS = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: clients.pem\n"


def hashed(password: bytes) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(4)).decode()  # cost 4: fast tests


def rewrite(path: Path, text: str | bytes) -> None:
    """Replace a file and move its mtime a second on, past any filesystem clock tick."""
    before = path.stat().st_mtime_ns if path.exists() else time.time_ns()
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


class Site:
    """The exporter's app served with a web config in a temporary folder."""

    def __init__(self, folder: Path, ca: trustme.CA) -> None:
        self.folder = folder
        self.ca_file = folder / "ca.pem"
        self.install(ca)
        self.clients = trustme.CA()
        self.clients.cert_pem.write_to_path(str(folder / "clients.pem"))
        self.config = folder / "web.yml"
        self.server: WSGIServer | None = None

    def install(self, ca: trustme.CA) -> None:
        """(Re)write the server certificate and key, issued by ``ca`` for 127.0.0.1."""
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(self.ca_file))
        rewrite(self.folder / "server.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        rewrite(self.folder / "server.key", leaf.private_key_pem.bytes())

    def start(self, text: str, idle_timeout: float = 10.0) -> int:
        rewrite(self.config, text)
        registry, book, clock = scenario()
        app = create_app(registry, book, clock=clock)
        server = serve(app, "127.0.0.1:0", str(self.config), idle_timeout=idle_timeout)
        self.server = server
        return int(server.server_address[1])

    def get(self, port: int, path: str = "/metrics", **kwargs: Any) -> requests.Response:
        kwargs.setdefault("verify", str(self.ca_file))
        return requests.get(f"https://127.0.0.1:{port}{path}", timeout=5, **kwargs)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path, trustme.CA())
    yield site
    if site.server is not None:
        site.server.shutdown()
        site.server.server_close()


def client_context(site: Site) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(site.ca_file))


def raw_get(port: int, context: ssl.SSLContext, path: str = "/-/healthy") -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        return b"".join(iter(lambda: tls.recv(65536), b""))


def test_tls_with_basic_auth_on_every_path(site: Site) -> None:
    headers = "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
    port = site.start(TLS + USERS.format(hash=hashed(b"s3cret")) + headers)
    ok = site.get(port, auth=("prometheus", "s3cret"))
    assert ok.status_code == 200 and "mailpartner_message_recipients{" in ok.text
    assert ok.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/metrics", "/", "/-/healthy", "/-/ready", "/nope"):
        for auth in (None, ("prometheus", "wrong"), ("nobody", "s3cret")):
            denied = site.get(port, path, auth=auth)
            assert denied.status_code == 401, (path, auth)
            assert denied.headers["WWW-Authenticate"] == 'Basic realm="mailpartner-exporter"'
            assert denied.headers["X-Content-Type-Options"] == "nosniff"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert b"HTTP/1.0 401" in raw_get(port, client_context(site))


def test_basic_auth_without_tls_is_plain_http(site: Site) -> None:
    port = site.start(USERS.format(hash=hashed(b"s3cret")))
    url = f"http://127.0.0.1:{port}/metrics"
    assert requests.get(url, auth=("prometheus", "s3cret"), timeout=5).status_code == 200
    assert requests.get(url, timeout=5).status_code == 401


def test_mutual_tls_needs_a_trusted_client_certificate(site: Site) -> None:
    port = site.start(MTLS)
    trusted = site.clients.issue_cert("prometheus.example")
    stranger = trustme.CA().issue_cert("prometheus.example")
    for name, leaf in (("trusted", trusted), ("stranger", stranger)):
        leaf.private_key_and_cert_chain_pem.write_to_path(str(site.folder / f"{name}.pem"))
    assert site.get(port, cert=str(site.folder / "trusted.pem")).status_code == 200
    for cert in (None, str(site.folder / "stranger.pem")):
        with pytest.raises(requests.ConnectionError):
            site.get(port, cert=cert)


def test_min_version_refuses_older_clients(site: Site) -> None:
    port = site.start(TLS + "  min_version: TLS13\n")
    old = client_context(site)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        raw_get(port, old)
    assert raw_get(port, client_context(site)).startswith(b"HTTP/1.0 200")


def test_changed_password_and_certificate_apply_to_the_next_request(site: Site) -> None:
    port = site.start(TLS + USERS.format(hash=hashed(b"old")))
    assert site.get(port, auth=("prometheus", "old")).status_code == 200
    rewrite(site.config, TLS + USERS.format(hash=hashed(b"new")))
    assert site.get(port, auth=("prometheus", "old")).status_code == 401  # the cache forgets it
    assert site.get(port, auth=("prometheus", "new")).status_code == 200

    old_ca = site.ca_file.read_bytes()
    site.install(trustme.CA())
    assert site.get(port, auth=("prometheus", "new")).status_code == 200
    (site.folder / "old-ca.pem").write_bytes(old_ca)
    with pytest.raises(requests.exceptions.SSLError):
        site.get(port, auth=("prometheus", "new"), verify=str(site.folder / "old-ca.pem"))


@pytest.mark.parametrize(
    ("broken", "logged"),
    [
        ("tls_server_config: [\n", "web.yml: line 2, column 1: did not find expected node content"),
        (TLS + "basic_auth_users:\n  prometheus: plain\n", "prometheus: not a bcrypt hash"),
        (TLS + "  client_auth_type: Sometimes\n", "client_auth_type: 'Sometimes' is not one"),
        (USERS.format(hash=hashed(b"new")), "turning TLS on or off needs a restart"),
        (TLS, "web.yml: basic_auth_users: turning basic auth off (no users left) needs a restart"),
    ],
    ids=["yaml", "hash", "client-auth", "tls-off", "auth-off"],
)
def test_broken_rewrite_keeps_the_last_good_config(
    site: Site, caplog: pytest.LogCaptureFixture, broken: str, logged: str
) -> None:
    port = site.start(TLS + USERS.format(hash=hashed(b"old")))
    rewrite(site.config, broken)
    with caplog.at_level(logging.ERROR, logger="exporter"):
        assert site.get(port, auth=("prometheus", "old")).status_code == 200
        assert site.get(port).status_code == 401
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "web config not reloaded, keeping the last good one"
    ]
    assert logged in errors[0].err  # type: ignore[attr-defined]
    rewrite(site.config, TLS + USERS.format(hash=hashed(b"new")))
    assert site.get(port, auth=("prometheus", "new")).status_code == 200


# Every way an edit can leave a running exporter with no user (the reason the issue was filed:
# each of these used to open every path until the next edit).
NO_USERS = {
    "empty": "",
    "comment-only": "# basic_auth_users moved to the vault\n",
    "empty-mapping": "basic_auth_users: {}\n",
    "null": "basic_auth_users:\n",
    "headers-only": "http_server_config:\n  headers:\n    X-Frame-Options: deny\n",
}
AUTH_OFF = "basic_auth_users: turning basic auth off (no users left) needs a restart"


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What each error logged said, with the temporary folder left out."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert {r.getMessage() for r in errors} <= {
        "web config not reloaded, keeping the last good one"
    }
    return [Path(r.err).name for r in errors]  # type: ignore[attr-defined]


@pytest.mark.parametrize("emptied", NO_USERS.values(), ids=NO_USERS.keys())
def test_watcher_keeps_basic_auth_when_a_reload_would_drop_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, emptied: str
) -> None:
    path = tmp_path / "web.yml"
    rewrite(path, USERS.format(hash=hashed(b"s3cret")))
    watcher = WebConfigWatcher(str(path))
    users = watcher.current().basic_auth_users
    rewrite(path, emptied)
    with caplog.at_level(logging.INFO, logger="exporter"):
        assert all(watcher.current().basic_auth_users == users for _ in range(5))
        assert refusals(caplog) == [f"web.yml: {AUTH_OFF}"]  # once, not once per request
        rewrite(path, emptied + "# edited again\n")
        assert watcher.current().basic_auth_users == users
        assert len(refusals(caplog)) == 2  # once per change of the file

        rewrite(path, USERS.format(hash=hashed(b"new")).replace("prometheus", "grafana"))
        assert list(watcher.current().basic_auth_users) == ["grafana"]
    assert len(refusals(caplog)) == 2
    assert caplog.records[-1].getMessage() == "web config reloaded"


def test_watcher_turns_basic_auth_on_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    rewrite(path, "")
    watcher = WebConfigWatcher(str(path))
    assert not watcher.current().basic_auth_users
    rewrite(path, USERS.format(hash=hashed(b"s3cret")))
    assert list(watcher.current().basic_auth_users) == ["prometheus"]


@pytest.mark.parametrize("emptied", NO_USERS.values(), ids=NO_USERS.keys())
def test_emptied_web_config_leaves_every_path_closed(
    site: Site, caplog: pytest.LogCaptureFixture, emptied: str
) -> None:
    port = site.start(USERS.format(hash=hashed(b"s3cret")))
    url = f"http://127.0.0.1:{port}"
    rewrite(site.config, emptied)
    with caplog.at_level(logging.ERROR, logger="exporter"):
        for path in ("/metrics", "/", "/-/healthy", "/-/ready", "/nope"):
            assert requests.get(url + path, timeout=5).status_code == 401, path
        assert requests.get(url, auth=("prometheus", "s3cret"), timeout=5).status_code == 200
    assert refusals(caplog) == [f"web.yml: {AUTH_OFF}"]
    rewrite(site.config, USERS.format(hash=hashed(b"new")))
    assert requests.get(url, auth=("prometheus", "new"), timeout=5).status_code == 200
    assert requests.get(url, auth=("prometheus", "s3cret"), timeout=5).status_code == 401


def test_emptied_web_config_keeps_tls_and_basic_auth(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    port = site.start(TLS + USERS.format(hash=hashed(b"s3cret")))
    rewrite(site.config, "")
    with caplog.at_level(logging.ERROR, logger="exporter"):
        assert site.get(port).status_code == 401
        assert site.get(port, auth=("prometheus", "s3cret")).status_code == 200
    assert refusals(caplog) == [
        "web.yml: tls_server_config: turning TLS on or off needs a restart",
        f"web.yml: {AUTH_OFF}",
    ]


def test_basic_auth_added_to_a_running_exporter_applies_at_once(site: Site) -> None:
    port = site.start("")
    url = f"http://127.0.0.1:{port}/metrics"
    assert requests.get(url, timeout=5).status_code == 200
    rewrite(site.config, USERS.format(hash=hashed(b"s3cret")))
    assert requests.get(url, timeout=5).status_code == 401
    assert requests.get(url, auth=("prometheus", "s3cret"), timeout=5).status_code == 200


def test_a_stalled_handshake_blocks_nobody(site: Site) -> None:
    port = site.start(TLS, idle_timeout=0.5)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled:
        stalled.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, and no more
        for _ in range(3):
            assert site.get(port, "/-/healthy").status_code == 200
        assert stalled.recv(1) == b""  # closed by the server once the handshake timed out


def test_bcrypt_runs_once_per_credentials() -> None:
    auth, users = BasicAuth(), {"prometheus": bcrypt.hashpw(b"pw", bcrypt.gensalt(12))}
    header = "Basic cHJvbWV0aGV1czpwdw=="  # prometheus:pw
    started = time.perf_counter()
    assert auth.allows(users, header)
    first = time.perf_counter() - started
    started = time.perf_counter()
    assert all(auth.allows(users, header) for _ in range(50))
    assert time.perf_counter() - started < first / 5
    for bad in (None, "Bearer x", "Basic !!!", "Basic cHJvbWV0aGV1cw==", "Basic " + "QUFB" * 40):
        assert not auth.allows(users, bad)


def error_for(tmp_path: Path, text: str, make: Callable[[Path], None] = lambda _: None) -> str:
    (tmp_path / "web.yml").write_text(text)
    make(tmp_path)
    with pytest.raises(ConfigErrors) as caught:
        load_web_config(str(tmp_path / "web.yml"))
    return "\n".join(str(e) for e in caught.value.errors).replace(f"{tmp_path}/", "")


def write_pair(folder: Path) -> None:
    leaf = trustme.CA().issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    leaf.private_key_pem.write_to_path(str(folder / "server.key"))


BAD = [
    ("tls_server_conf: {}\n", "tls_server_conf", "unknown key (did you mean tls_server_config?)"),
    (TLS + "  certfile: x\n", "tls_server_config.certfile",
     "unknown key (did you mean cert_file?)"),
    (TLS + "  client_allowed_sans: [a]\n", "tls_server_config.client_allowed_sans",
     "not supported by this exporter"),
    ("rate_limit: {burst: 1}\n", "rate_limit", "not supported by this exporter"),
    (TLS.replace("server.pem", "gone.pem"), "tls_server_config.cert_file",
     "cannot read gone.pem: No such file or directory"),
    ("tls_server_config:\n  key_file: server.key\n", "tls_server_config.cert_file",
     "required when tls_server_config is set"),
    (TLS + "  client_auth_type: Always\n", "tls_server_config.client_auth_type",
     "'Always' is not one of NoClientCert, RequestClientCert, RequireAnyClientCert, "
     "RequireClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"),
    (TLS + "  client_auth_type: RequireAndVerifyClientCert\n", "tls_server_config.client_ca_file",
     "required with client_auth_type RequireAndVerifyClientCert"),
    (TLS + "  client_ca_file: server.pem\n", "tls_server_config.client_ca_file",
     "set client_auth_type too: NoClientCert asks for no client certificate"),
    (TLS + "  min_version: TLS13\n  max_version: TLS12\n", "tls_server_config.min_version",
     "above max_version"),
    (TLS + "  min_version: SSL3\n", "tls_server_config.min_version",
     "'SSL3' is not one of TLS10, TLS11, TLS12, TLS13"),
    (TLS + "  cipher_suites: TLS_AES_128_GCM_SHA256\n", "tls_server_config.cipher_suites",
     "must be a list"),
    ("basic_auth_users:\n  alice: $2y$10$tooshort\n", "basic_auth_users.alice",
     "not a bcrypt hash ($2y$10$...)"),
    ("basic_auth_users:\n  alice: hunter2\n", "basic_auth_users.alice",
     "not a bcrypt hash ($2y$10$...)"),
    ("basic_auth_users: [alice]\n", "basic_auth_users", "must be a mapping of user: hash"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
     "http_server_config.headers.X-Frame-Options", "must be deny or sameorigin"),
    ("http_server_config:\n  headers:\n    Server: me\n", "http_server_config.headers.Server",
     "unknown key"),
    ("http_server_config:\n  http2: maybe\n", "http_server_config.http2", "must be true or false"),
    ("basic_auth_users: {}\nbasic_auth_users: {}\n", "",
     "line 2, column 1: key 'basic_auth_users' appears twice"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "key", "problem"), BAD, ids=[f"{i}-{k}" for i, (_, k, _) in enumerate(BAD)]
)
def test_config_errors_name_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    where = f"web.yml: {key}" if key else "web.yml"
    assert error_for(tmp_path, text, write_pair) == f"{where}: {problem}"


def test_certificate_and_key_that_do_not_match(tmp_path: Path) -> None:
    def mismatched(folder: Path) -> None:
        write_pair(folder)
        trustme.CA().issue_cert("x").private_key_pem.write_to_path(str(folder / "server.key"))

    assert error_for(tmp_path, TLS, mismatched) == (
        "web.yml: tls_server_config.cert_file: with key_file, not a PEM certificate and its"
        " unencrypted key (KEY_VALUES_MISMATCH)"
    )


def test_relative_paths_are_relative_to_the_web_config(tmp_path: Path) -> None:
    write_pair(tmp_path)
    (tmp_path / "web.yml").write_text(TLS)
    config = load_web_config(str(tmp_path / "web.yml"))
    assert config.tls is not None and config.tls.cert_file == tmp_path / "server.pem"
    assert config.ssl_context is not None and config.tls.min_version == ssl.TLSVersion.TLSv1_2
