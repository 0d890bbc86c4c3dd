"""The README's snippets, run as a reader would run them.

Each is read from README.md itself: the fenced blocks after a heading or a bold lead-in,
never a copy. Only what must point at the test's own processes changes: ``localhost:10027``
and the scrape target become the loopback address of a ``--demo`` exporter, and the shipped
``config.yaml`` gets the simulator's URL as its API. What is asserted is what the reader
sees: the answer to a registration, the message in ``/metrics``, the printed check, a
Prometheus scraping over TLS with a password.

Other tests read the README too: ``test_dashboard.py`` (the metric tables) and
``test_deploy.py`` (the kustomize overlay).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import requests
import trustme
import yaml

from exporter.simulator import SimulatorServer, World
from exporter.webconfig import load_web_config
from tests.conftest import TEST_KEY, require, require_tool
from tests.stack import (
    REPO,
    Prometheus,
    SecuredService,
    Service,
    start_exporter,
    start_secured_exporter,
    wait_until,
)

README = REPO / "README.md"
# Where the README's commands expect the exporter.
README_EXPORTER = "localhost:10027"
# The web config's placeholder for the hash its commands make.
HASH_PLACEHOLDER = "$2b$10$…"
PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class Block:
    language: str
    text: str


def blocks_after(lead: str) -> list[Block]:
    """The fenced blocks from the README line that starts with ``lead`` to the next heading."""
    lines = iter(README.read_text(encoding="utf-8").splitlines(keepends=True))
    if not any(line.startswith(lead) for line in lines):
        raise AssertionError(f"README.md has no line starting with {lead!r}")
    blocks: list[Block] = []
    for line in lines:
        if line.startswith("```"):  # a block, to its closing fence: its "# " lines are its own
            body: list[str] = []
            for inner in lines:
                if inner.rstrip("\n") == "```":
                    break
                body.append(inner)
            blocks.append(Block(line[3:].strip(), "".join(body)))
        elif line.startswith("#"):
            break
    return blocks


def only(blocks: list[Block], language: str, containing: str = "") -> str:
    """The one ``language`` block among ``blocks`` with ``containing`` in it."""
    found = [b.text for b in blocks if b.language == language and containing in b.text]
    assert len(found) == 1, f"{len(found)} {language} blocks with {containing!r}, not one"
    return found[0]


def pointed_at(text: str, address: str) -> str:
    """``text`` with the README's exporter address replaced by ``address``."""
    assert README_EXPORTER in text, f"the snippet no longer names {README_EXPORTER}"
    return text.replace(README_EXPORTER, address)


def commands(script: str) -> list[tuple[str, list[str]]]:
    """A shell block's commands (continuation lines joined), each with the ``# `` comment
    lines after it: the output the README shows for it."""
    result: list[tuple[str, list[str]]] = []
    for line in script.replace("\\\n", " ").splitlines():
        if line.startswith("# ") and result:
            result[-1][1].append(line[2:])
        elif line.strip():
            result.append((line, []))
    return result


def sh(
    command: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    typed: str | None = None,
    terminal: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``command`` in bash, with this virtual environment's commands first on the PATH, as
    in the shell of a reader who followed the README's install steps; ``typed`` on its
    standard input. Without ``terminal``, in a session of its own: a password prompt then
    reads standard input, whatever terminal the tests run in."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        ["bash", "-c", command],
        input=typed,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env={**os.environ, "PATH": path, **(env or {})},
        start_new_session=not terminal,
    )


def series_of(exposition: str, message_id: str) -> dict[str, str]:
    """``mailpartner_message_recipients`` of ``message_id``: series (name and labels) → value."""
    found = re.findall(
        rf'^(mailpartner_message_recipients\{{[^}}]*message_id="{message_id}"[^}}]*\}}) (\S+)$',
        exposition,
        re.M,
    )
    return dict(found)


# --- registering messages -----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``mailpartner-exporter --demo``, as the README says to try the commands with."""
    environ = {k: v for k, v in os.environ.items() if k != "MAILPARTNER_API_KEY"}
    exporter = start_exporter(tmp_path_factory.mktemp("demo"), "--demo", cwd=REPO, env=environ)
    yield exporter
    exporter.stop()
    assert exporter.process.returncode == 0, exporter.log.read_text()


def registered(url: str) -> dict[str, dict[str, str]]:
    """``GET /api/v1/messages``: each registered ID's labels."""
    answer = requests.get(f"{url}/api/v1/messages", timeout=5).json()
    return {m["id"]: m["labels"] for m in answer["data"]}


def unregister_all(url: str) -> None:
    for message_id in registered(url):
        requests.delete(f"{url}/api/v1/messages/{message_id}", timeout=5)


@pytest.fixture
def exporter(demo: Service) -> Iterator[Service]:
    """The demo exporter with no registration (the demo makes none), before and after."""
    unregister_all(demo.url)
    yield demo
    unregister_all(demo.url)


def polled_with(url: str, message_id: str, labels: dict[str, str]) -> dict[str, str]:
    """The message's recipient counts in ``/metrics``, once they carry ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]

    def found() -> dict[str, str] | None:
        series = series_of(requests.get(f"{url}/metrics", timeout=5).text, message_id)
        return series if series and all(all(w in s for w in wanted) for s in series) else None

    return wait_until(found, 10, f"message {message_id} with {labels} in /metrics")


def register_call(script: str) -> tuple[str, str]:
    """The ID and campaign of the snippet's ``register(...)`` call, as it is written."""
    call = re.search(r"""^register\((["'])(.+?)\1, (["'])(.+?)\3\);?$""", script, re.M)
    assert call, "the snippet no longer ends with a register(id, campaign) call"
    return call[2], call[4]


@pytest.mark.e2e
def test_the_curl_commands_register_the_message_and_delete_it(exporter: Service) -> None:
    blocks = blocks_after("**Registering messages.**")
    address = exporter.url.removeprefix("http://")
    (post, _), (delete, _) = commands(pointed_at(only(blocks, "sh", "curl"), address))
    body = json.loads(shlex.split(post)[-1])  # what the command sends: -d '{…}'
    answer = sh(post)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["data"]["labels"] == body["labels"]
    assert registered(exporter.url)[body["id"]] == body["labels"]
    assert polled_with(exporter.url, body["id"], body["labels"])

    answer = sh(delete)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == {"status": "success", "data": {"id": body["id"]}}
    assert body["id"] not in registered(exporter.url)


@pytest.mark.e2e
def test_the_python_function_registers_the_message(exporter: Service, tmp_path: Path) -> None:
    blocks = blocks_after("**Registering messages.**")
    script = pointed_at(only(blocks, "python"), exporter.url.removeprefix("http://"))
    message_id, campaign = register_call(script)
    (tmp_path / "register.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "register.py"], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert registered(exporter.url)[message_id] == {"campaign": campaign}
    assert polled_with(exporter.url, message_id, {"campaign": campaign})


def php_with_curl() -> str:
    """``php``, with its curl extension; skip where either is missing, fail under CI."""
    php = require_tool("php")
    loaded = subprocess.run([php, "-r", "exit(extension_loaded('curl') ? 0 : 1);"], check=False)
    require(loaded.returncode == 0, "PHP's curl extension is not installed (Debian php-curl)")
    return php


@pytest.mark.e2e
def test_the_php_function_registers_the_message(exporter: Service, tmp_path: Path) -> None:
    blocks = blocks_after("**Registering messages.**")
    script = pointed_at(only(blocks, "php"), exporter.url.removeprefix("http://"))
    message_id, campaign = register_call(script)
    (tmp_path / "register.php").write_text(script)
    php = require_tool("php")
    lint = subprocess.run([php, "-l", "register.php"], capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    php = php_with_curl()
    # Every notice and warning shows: a variable from outside the function would.
    strict = ["-d", "error_reporting=-1", "-d", "display_errors=stderr"]
    result = subprocess.run(
        [php, *strict, "register.php"], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert registered(exporter.url)[message_id] == {"campaign": campaign}
    assert polled_with(exporter.url, message_id, {"campaign": campaign})


# --- the web config, its password hash, the scrape job ---------------------------------------


def web_security() -> tuple[str, list[str], str]:
    """The web config, the commands that make its hash, and Prometheus' scrape job."""
    blocks = blocks_after("**Web security.**")
    web, scrape = [b.text for b in blocks if b.language == "yaml"]
    hashing = [command for command, _ in commands(only(blocks, "sh"))]
    return web, hashing, scrape


def hashed_by(command: str) -> str:
    """The hash ``command`` prints for ``PASSWORD`` typed at its prompt (htpasswd asks twice)."""
    made = sh(command, typed=f"{PASSWORD}\n{PASSWORD}\n", terminal=False)
    assert made.returncode == 0, made.stderr
    hashed = made.stdout.strip()
    assert bcrypt.checkpw(PASSWORD.encode(), hashed.encode()), made.stdout
    return hashed


def test_the_python_hash_command_makes_a_hash_the_web_config_takes(tmp_path: Path) -> None:
    _, hashing, _ = web_security()
    (python,) = [c for c in hashing if c.startswith("python3 ")]
    hashed = hashed_by(python)
    assert hashed.startswith("$2b$10$")  # the cost the README's placeholder shows
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    assert list(load_web_config(str(path)).basic_auth_users) == ["prometheus"]


def test_the_htpasswd_command_makes_a_hash_the_web_config_takes(tmp_path: Path) -> None:
    require_tool("htpasswd")
    _, hashing, _ = web_security()
    (htpasswd,) = [c for c in hashing if c.startswith("htpasswd ")]
    hashed = hashed_by(htpasswd)
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    assert list(load_web_config(str(path)).basic_auth_users) == ["prometheus"]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredService]:
    """A ``--demo`` exporter with the README's web config: its certificate and key where it
    names them, and a hash made by its command where it shows the placeholder."""
    tmp = tmp_path_factory.mktemp("secured")
    web, hashing, _ = web_security()
    assert HASH_PLACEHOLDER in web
    (python,) = [c for c in hashing if c.startswith("python3 ")]
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp / "exporter-ca.pem")
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(tmp / "exporter.crt")
    issued.private_key_pem.write_to_path(tmp / "exporter.key")
    (tmp / "web-config.yml").write_text(web.replace(HASH_PLACEHOLDER, hashed_by(python)))
    environ = {k: v for k, v in os.environ.items() if k != "MAILPARTNER_API_KEY"}
    exporter = start_secured_exporter(
        tmp,
        tmp / "web-config.yml",
        tmp / "exporter-ca.pem",
        ("prometheus", PASSWORD),
        "--demo",
        cwd=REPO,
        env=environ,
    )
    yield exporter
    exporter.stop()
    assert exporter.process.returncode == 0, exporter.log.read_text()


@pytest.mark.e2e
def test_the_web_config_asks_for_the_password_over_tls(secured: SecuredService) -> None:
    metrics = f"{secured.url}/metrics"
    assert requests.get(metrics, verify=str(secured.ca_file), timeout=5).status_code == 401
    wrong = ("prometheus", "wrong")
    assert (
        requests.get(metrics, verify=str(secured.ca_file), auth=wrong, timeout=5).status_code == 401
    )
    answer = requests.get(metrics, verify=str(secured.ca_file), auth=secured.auth, timeout=5)
    assert answer.status_code == 200 and "mailpartner_exporter_build_info" in answer.text
    assert answer.headers["X-Content-Type-Options"] == "nosniff"  # http_server_config.headers


@pytest.mark.e2e
def test_prometheus_scrapes_it_with_the_readme_job(secured: SecuredService, tmp_path: Path) -> None:
    require_tool("prometheus")
    _, _, scrape = web_security()
    target = secured.url.removeprefix("https://")
    job = yaml.safe_load(scrape.replace("exporter.example:10027", target))
    # The files the job names, beside prometheus.yml, where it reads relative paths from.
    tls, auth = job["scrape_configs"][0]["tls_config"], job["scrape_configs"][0]["basic_auth"]
    for path in (tls["ca_file"], auth["password_file"]):
        assert not Path(path).is_absolute(), f"{path}: not beside prometheus.yml"
    (tmp_path / tls["ca_file"]).write_bytes(secured.ca_file.read_bytes())
    (tmp_path / auth["password_file"]).write_text(PASSWORD)
    prometheus = Prometheus(tmp_path, {"global": {"scrape_interval": "1s"}, **job})
    try:

        def scraped() -> bool:
            results = prometheus.query('up{job="mailpartner-exporter"}')["data"]["result"]
            return bool(results) and results[0]["value"][1] == "1"

        wait_until(scraped, 20, "Prometheus scraping the exporter")
        build = prometheus.query("mailpartner_exporter_build_info")["data"]["result"]
        assert build and build[0]["metric"]["instance"] == target
    finally:
        prometheus.stop()


# --- --config.check and --once -----------------------------------------------------------


@pytest.fixture
def shipped_config(tmp_path: Path) -> Iterator[Path]:
    """The repository's ``config.yaml`` in a folder of its own, its API the simulator, which
    has made its messages' sends."""
    with SimulatorServer(World(seed=5), api_key=TEST_KEY) as simulator:
        shipped = (REPO / "config.yaml").read_text(encoding="utf-8")
        config = yaml.safe_load(shipped)
        for message in config["messages"]:
            simulator.world.send(200, message_id=message["id"], campaign="c")
        real_api = config["api"]["base_url"]
        assert real_api in shipped
        (tmp_path / "config.yaml").write_text(shipped.replace(real_api, simulator.url))
        yield tmp_path


@pytest.mark.e2e
def test_the_check_and_once_commands_print_what_the_readme_shows(shipped_config: Path) -> None:
    blocks = blocks_after("## Running it for real")
    (check, check_shows), (once, once_shows) = commands(only(blocks, "sh", "--config.check"))
    assert "--config.check" in check and "--once" in once
    env = {"MAILPARTNER_API_KEY": TEST_KEY}  # as the block before it exports

    result = sh(check, cwd=shipped_config, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == check_shows

    result = sh(once, cwd=shipped_config, env=env)
    assert result.returncode == 0, result.stderr
    assert "poll failed" not in result.stderr and TEST_KEY not in result.stdout + result.stderr
    # The same series as shown, in the same order; the counts are the reader's own.
    printed = [line.rsplit(" ", 1) for line in result.stdout.splitlines()]
    shown = [line.rsplit(" ", 1) for line in once_shows]
    assert [series for series, _ in printed] == [series for series, _ in shown]
    assert all(float(value) >= 0 for _, value in printed)
