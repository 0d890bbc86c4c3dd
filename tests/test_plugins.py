"""Source plugins, found through their entry point as pip installs them: docs/examples'
``example`` configured, checked, and polled by a real exporter process (docs/plugins.md)."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter, load_runnable
from exporter.config.errors import ConfigErrors
from exporter.config.loader import load_config
from exporter.simulator import SimulatorServer
from exporter.sources import PeriodicSource
from exporter.sources.account import AccountSource
from exporter.sources.registry import available
from tests.conftest import TEST_KEY, CraftedServer
from tests.stack import REPO, start_exporter, wait_until

EXAMPLE = REPO / "docs" / "examples" / "mailpartner_example_source"
MODULE = "mailpartner_example_source"
BROKEN = "mailpartner_broken_source"
GROUP = "mailpartner_exporter.sources"
INSTALLED = "account, bulk_status, example, smspartner_bulk_status"
NOT_A_DURATION = "'soon' is not a duration (use e.g. 30s, 2m, 1h30m, 7d)"


def install(site: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """What pip leaves in site-packages for a distribution: its modules and a dist-info
    folder whose entry_points.txt names them."""
    site.mkdir(exist_ok=True)
    for module, text in modules.items():
        (site / f"{module}.py").write_text(text)
    dist_info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}")


def example_project() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    return project


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The example installed as its pyproject.toml declares it, on ``sys.path``."""
    project = example_project()
    entry_points = project["entry-points"][GROUP]  # type: ignore[index]
    folder = tmp_path / "site"
    install(
        folder,
        str(project["name"]),
        entry_points,
        {MODULE: (EXAMPLE / f"{MODULE}.py").read_text()},
    )
    monkeypatch.syspath_prepend(folder)
    yield folder
    for module in (MODULE, BROKEN):  # the next test imports its own copy
        sys.modules.pop(module, None)


def write_config(path: Path, sources: object, base_url: str = "http://127.0.0.1:9/v1") -> Path:
    config = {"api": {"base_url": base_url, "timeout": "2s"}, "sources": sources}
    path.write_text(yaml.safe_dump(config))
    return path


def config_errors(path: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as raised:
        load_config(path, available())
    return str(raised.value).splitlines()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- discovery and configuration ------------------------------------------------------


def test_the_entry_point_makes_example_an_installed_source(site: Path) -> None:
    kind = available()["example"]
    assert isinstance(kind, type)
    assert (kind.__module__, kind.__qualname__, kind.name) == (
        MODULE,
        "PendingSendsSource",
        "example",
    )
    assert Path(sys.modules[MODULE].__file__ or "").parent == site


def test_a_config_enabling_example_loads(site: Path, tmp_path: Path) -> None:
    config = load_config(
        write_config(tmp_path / "c.yaml", {"example": {"every": "2s"}}), available()
    )
    assert config.sources is not None
    by_name = {source.name: source for source in config.sources}
    assert list(by_name) == ["bulk_status", "example"]
    assert by_name["example"].kind is available()["example"]
    assert dict(by_name["example"].settings) == {"every": 2.0}


def test_every_defaults_to_a_minute(site: Path, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.yaml", {"example": None}), available())
    assert config.sources is not None
    assert dict(config.sources[-1].settings) == {"every": 60.0}


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"every": "soon"}, f"sources.example.every: {NOT_A_DURATION}"),
        ({"evry": "1s"}, "sources.example.evry: unknown key (did you mean every?)"),
        ("1m", "sources.example: must be a mapping, not a string"),
    ],
    ids=["bad-value", "unknown-key", "not-a-mapping"],
)
def test_option_errors_name_the_file_and_key(
    site: Path, tmp_path: Path, section: object, error: str
) -> None:
    path = write_config(tmp_path / "c.yaml", {"example": section})
    assert config_errors(path) == [f"{path}: {error}"]


def test_a_misspelt_source_lists_the_installed_ones(site: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", {"exampel": {}})
    assert config_errors(path) == [
        f"{path}: sources.exampel: unknown source (did you mean example? installed: {INSTALLED})"
    ]


@pytest.mark.e2e
def test_config_check_reports_plugin_option_errors(site: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", {"example": {"every": "soon"}})
    env = {**os.environ, "PYTHONPATH": python_path(site), "MAILPARTNER_API_KEY": TEST_KEY}

    def check() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "exporter", "--config.file", str(path), "--config.check"]
        return subprocess.run(command, capture_output=True, text=True, env=env, check=False)

    failed = check()
    assert (failed.returncode, failed.stdout) == (1, "")
    assert failed.stderr == f"{path}: sources.example.every: {NOT_A_DURATION}\n"
    write_config(path, {"example": {"every": "1m"}})
    passed = check()
    assert (passed.returncode, passed.stdout, passed.stderr) == (
        0,
        f"{path}: OK, 0 messages, sources: bulk_status, example\n",
        "",
    )


def test_a_broken_plugin_is_reported_only_where_configured(site: Path, tmp_path: Path) -> None:
    install(
        site,
        "mailpartner-broken-source",
        {"broken": f"{BROKEN}:BrokenSource"},
        {BROKEN: "raise ImportError('needs libfoo, which is not installed')\n"},
    )
    assert isinstance(available()["broken"], RuntimeError)
    fine = load_config(write_config(tmp_path / "fine.yaml", {"example": {}}), available())
    assert fine.sources is not None
    assert [source.name for source in fine.sources] == ["bulk_status", "example"]

    path = write_config(tmp_path / "c.yaml", {"example": {}, "broken": {"every": "1m"}})
    assert config_errors(path) == [
        f"{path}: sources.broken: its plugin cannot be loaded: {BROKEN}:BrokenSource:"
        " ImportError: needs libfoo, which is not installed"
    ]


def test_a_plugin_class_that_is_not_a_source_is_reported(site: Path, tmp_path: Path) -> None:
    install(site, "mailpartner-odd-source", {"odd": f"{MODULE}:to_send"}, {})
    path = write_config(tmp_path / "c.yaml", {"odd": {}})
    assert config_errors(path) == [
        f"{path}: sources.odd: its plugin cannot be loaded: {MODULE}:to_send"
        " is not a subclass of Source"
    ]


def test_a_plugin_cannot_take_a_built_in_name(site: Path) -> None:
    install(site, "mailpartner-impostor", {"account": f"{MODULE}:PendingSendsSource"}, {})
    assert available()["account"] is AccountSource


# -- polling --------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_real_exporter_serves_the_plugin_series(
    site: Path, simulator: SimulatorServer, tmp_path: Path
) -> None:
    simulator.world.send(120)
    simulator.world.send(30)
    waiting = simulator.world.waiting()  # the simulator's clock is frozen: this stays
    assert waiting > 0
    config = write_config(tmp_path / "c.yaml", {"example": {"every": "1h"}}, simulator.url)
    exporter = start_exporter(
        tmp_path,
        "--config.file",
        str(config),
        env={"PYTHONPATH": python_path(site), "MAILPARTNER_API_KEY": TEST_KEY},
    )
    try:
        text = wait_until(
            lambda: scrape_with(exporter.url, "mailpartner_example_pending_sends"),
            10,
            "the example's series on /metrics",
        )
    finally:
        exporter.stop()
    values = samples(text)
    assert values[("mailpartner_example_pending_sends", ())] == waiting
    assert values[("mailpartner_example_poll_success", ())] == 1
    # every: 1h — one request so far, counted as the process's own Mail Partner requests
    assert values[("mailpartner_api_requests_total", (("endpoint", "me"),))] == 1
    assert values[("mailpartner_up", ())] == 1
    assert simulator.stats().requests == {"me": 1}
    assert TEST_KEY not in exporter.log.read_text()


def test_a_failed_poll_keeps_the_error_counted_and_a_reload_keeps_the_source(
    site: Path, simulator: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILPARTNER_API_KEY", TEST_KEY)
    simulator.world.send(40)
    path = write_config(tmp_path / "c.yaml", {"example": {"every": "1m"}}, simulator.url)
    simulator.faults.reject_key = True
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    value = exporter.registry.get_sample_value
    assert not exporter.poller.poll_all()
    assert value("mailpartner_example_poll_success") == 0
    assert value("mailpartner_example_pending_sends") is None  # never a made-up 0
    assert value("mailpartner_api_errors_total", {"endpoint": "me", "code": "10"}) == 1
    assert value("mailpartner_up") == 0

    simulator.faults.reject_key = False
    before = exporter.sources["example"]
    write_config(path, {"example": {"every": "2m"}}, simulator.url)
    assert exporter.reload() is None
    kept = exporter.sources["example"]
    assert kept is before  # a PeriodicSource takes new settings in place
    assert isinstance(kept, PeriodicSource)
    assert kept.every == 120
    assert exporter.poller.poll_all()
    assert value("mailpartner_example_pending_sends") == simulator.world.waiting()
    assert value("mailpartner_example_poll_success") == 1
    assert value("mailpartner_api_requests_total", {"endpoint": "me"}) == 2


def test_an_answer_without_to_send_fails_the_poll_not_the_request(
    site: Path,
    crafted: Callable[[Callable[[str], CraftedServer.Reply]], CraftedServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILPARTNER_API_KEY", TEST_KEY)
    body = b'{"success": true, "credits": {"creditMail": 5}}'
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    server = crafted(lambda path: (200, headers, [body]))
    path = write_config(tmp_path / "c.yaml", {"example": {}}, server.url)
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    value = exporter.registry.get_sample_value
    assert not exporter.poller.poll_all()
    assert value("mailpartner_example_poll_success") == 0
    assert value("mailpartner_example_pending_sends") is None
    assert value("mailpartner_api_requests_total", {"endpoint": "me"}) == 1
    for reason in ("timeout", "connection", "invalid_response"):
        failures = {"endpoint": "me", "reason": reason}
        assert value("mailpartner_api_request_failures_total", failures) == 0
    assert value("mailpartner_up") == 1  # the API answered: only the poll failed


@pytest.mark.parametrize(
    ("credits", "expected"),
    [
        ({"toSend": 12}, 12.0),
        ({"toSend": "12.5"}, 12.5),
        ({"toSend": True}, None),
        ({"toSend": "nan"}, None),
        ({"toSend": "many"}, None),
        ({}, None),
        ("credits", None),
    ],
)
def test_to_send_reads_numbers_and_numeric_strings(
    site: Path, credits: object, expected: float | None
) -> None:
    to_send = importlib.import_module(MODULE).to_send
    assert to_send({"credits": credits}) == expected


# -- the documentation ----------------------------------------------------------------


def test_the_doc_shows_the_example_files_exactly() -> None:
    doc = (REPO / "docs" / "plugins.md").read_text()
    included = re.findall(r"<!-- literalinclude: (\S+) -->\n```\w*\n(.*?)^```$", doc, re.S | re.M)
    shown = {name: text for name, text in included}
    assert set(shown) == {
        "examples/mailpartner_example_source/mailpartner_example_source.py",
        "examples/mailpartner_example_source/pyproject.toml",
    }
    for name, text in shown.items():
        assert text == (REPO / "docs" / name).read_text(), f"docs/plugins.md's copy of {name}"


@pytest.mark.e2e
def test_the_example_builds_a_wheel_declaring_its_entry_point(tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="the example's build backend (pip wheel, offline)")
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source)  # a build must not leave files in the repository
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--disable-pip-version-check"]
    subprocess.run(
        [*command, "--wheel-dir", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read("mailpartner_example_source-0.1.0.dist-info/entry_points.txt")
    assert f"{MODULE}.py" in names
    assert entry_points.decode().split() == [
        f"[{GROUP}]",
        "example",
        "=",
        f"{MODULE}:PendingSendsSource",
    ]


# -- helpers --------------------------------------------------------------------------


def python_path(site: Path) -> str:
    """The child's PYTHONPATH: the plugin's folder, then this checkout (as the parent has)."""
    return os.pathsep.join(p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def scrape_with(url: str, needle: str) -> str | None:
    text = requests.get(f"{url}/metrics", timeout=2).text
    return text if needle in text else None


FAILING_PLUGIN = """
from exporter.sources import PeriodicSource


class Failing(PeriodicSource):
    def __init__(self, context, settings):
        # A careless plugin quoting the key in its error.
        raise RuntimeError(f"refused {context.config.api.api_key.reveal()}")

    def fetch(self):
        pass

    def collect(self):
        return []
"""


@pytest.mark.e2e
def test_a_plugin_that_cannot_start_refuses_the_reload_without_quoting_the_key(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILPARTNER_API_KEY", TEST_KEY)
    install(
        site,
        "failing-plugin",
        {"failing": "failing_plugin:Failing"},
        {"failing_plugin": FAILING_PLUGIN},
    )
    path = write_config(tmp_path / "c.yaml", {})
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    write_config(path, {"failing": {}})
    error = exporter.reload()
    assert error == f"{path}: sources.failing: cannot start: RuntimeError: refused <redacted>"
    assert set(exporter.sources) == {"bulk_status"}  # the old configuration runs on
    assert (
        exporter.registry.get_sample_value("mailpartner_exporter_config_last_reload_successful")
        == 0
    )

    # At startup, the same is an error naming the file, and the exporter exits 1.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            "--config.file",
            str(path),
            "--web.listen-address",
            "127.0.0.1:0",
        ],
        env={**os.environ, "PYTHONPATH": python_path(site)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert (
        f"{path}: sources.failing: cannot start: RuntimeError: refused <redacted>" in result.stderr
    )
    assert TEST_KEY not in result.stderr + result.stdout
