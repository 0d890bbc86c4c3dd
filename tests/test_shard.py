"""Sharding: a stable hash splits the messages; three shards poll what one exporter would.

The end-to-end test runs three sharded exporter processes and one unsharded one against one
simulator, and checks that every message is polled by exactly one shard and that the three
shards' series add up to the unsharded exporter's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter, load_runnable
from exporter.cli import main
from exporter.config import errors as e
from exporter.config.errors import ConfigErrors
from exporter.config.loader import load_config
from exporter.config.model import Config
from exporter.demo import Demo
from exporter.domain import MessageSpec
from exporter.forward import Forwarder
from exporter.registration import messages_app
from exporter.shard import Shard, ShardFlags, parse_count, parse_index, shard_of
from exporter.simulator import SimulatorServer, World
from exporter.sources.registry import available
from tests import test_deploy as deploy
from tests.conftest import TEST_KEY
from tests.stack import Service, free_port, start_exporter, wait_until

IDS = [str(7000 + i) for i in range(30)]
POD = "mailpartner-exporter"

# --- the hash ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_id", "sha256_prefix", "count", "shard"),
    [
        ("300", "983bd614bb5afece", 3, 0),
        ("300", "983bd614bb5afece", 7, 6),
        ("301", "c3ea99f86b2f8a74", 3, 2),
        ("1000", "40510175845988f1", 3, 0),
        ("msg-42", "22ca0cc9586a0c8e", 7, 4),
    ],
)
def test_known_ids_go_to_known_shards(
    message_id: str, sha256_prefix: str, count: int, shard: int
) -> None:
    # Hard-coded: a change of hash function would move every message to another replica.
    assert hashlib.sha256(message_id.encode()).hexdigest()[:16] == sha256_prefix
    assert int(sha256_prefix, 16) % count == shard
    assert shard_of(message_id, count) == shard
    assert Shard(count, shard).owns(message_id)
    assert not Shard(count, (shard + 1) % count).owns(message_id)


@pytest.mark.e2e
def test_the_hash_is_the_same_in_every_process() -> None:
    """Python's hash() is salted per process; the shard must not be."""
    ids = ["300", "301", "abc", "ü-ünicode", *IDS]
    code = (
        "import sys; from exporter.shard import shard_of; "
        "print(' '.join(str(shard_of(i, 5)) for i in sys.argv[1:]))"
    )
    expected = " ".join(str(shard_of(i, 5)) for i in ids)
    for seed in ("1", "2", "random"):
        result = subprocess.run(
            [sys.executable, "-c", code, *ids],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=Path(__file__).parent.parent,
        )
        assert result.stdout.strip() == expected


@pytest.mark.parametrize("count", [2, 3, 7, 16])
@pytest.mark.parametrize("shape", ["{}", "msg-{}", "{:08d}"])
def test_shards_are_even_over_10000_ids(count: int, shape: str) -> None:
    n = 10_000
    sizes = Counter(shard_of(shape.format(i), count) for i in range(n))
    assert set(sizes) == set(range(count))
    # As even as random draws: each shard within 5 standard deviations of n/count.
    expected = n / count
    sigma = math.sqrt(n * (1 / count) * (1 - 1 / count))
    assert all(abs(size - expected) < 5 * sigma for size in sizes.values()), sizes
    # and no shard more than a quarter above another (at most ~4 sigma apart here).
    assert max(sizes.values()) < 1.25 * min(sizes.values()), sizes


def test_every_id_is_owned_by_exactly_one_shard() -> None:
    for count in (1, 2, 3, 5):
        for message_id in [*IDS, "", "x" * 128, "\ud800-lone-surrogate"]:
            owners = [i for i in range(count) if Shard(count, i).owns(message_id)]
            assert len(owners) == 1


def test_one_shard_owns_everything() -> None:
    assert Shard.ALL == Shard(1, 0) == Shard()
    assert not Shard.ALL.sharded
    assert all(Shard.ALL.owns(i) for i in IDS)
    specs = [MessageSpec(i) for i in IDS]
    assert Shard.ALL.select(specs) == tuple(specs)


def test_select_keeps_the_order() -> None:
    specs = [MessageSpec(i) for i in IDS]
    parts = [Shard(3, i).select(specs) for i in range(3)]
    for part in parts:
        assert list(part) == [s for s in specs if s in part]
    assert sorted(s.id for part in parts for s in part) == sorted(IDS)


@pytest.mark.parametrize(("count", "index"), [(0, 0), (-1, 0), (3, 3), (3, -1), (1, 1)])
def test_impossible_shards_are_refused(count: int, index: int) -> None:
    with pytest.raises(ValueError, match="shard"):
        Shard(count, index)


# --- index auto, counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostname", "index"),
    [
        (f"{POD}-0", 0),
        (f"{POD}-2", 2),
        (f"{POD}-12", 12),
        ("web-3.shards.monitoring.svc.cluster.local", 3),
    ],
)
def test_auto_index_is_the_pod_ordinal(hostname: str, index: int) -> None:
    assert parse_index("auto", {"HOSTNAME": hostname}) == index


@pytest.mark.parametrize("hostname", ["exporter", "exporter-", "exporter-x", "3"])
def test_auto_index_needs_a_number_after_a_dash(hostname: str) -> None:
    with pytest.raises(ValueError, match="does not end in -<number>"):
        parse_index("auto", {"HOSTNAME": hostname})


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("-1", "must be at least 0"),
        ("two", "'two' is not an integer or auto"),
        (1.5, "must be an integer or auto, not float"),
        (True, "must be an integer or auto, not bool"),
        (None, "must be an integer or auto, not empty"),
    ],
)
def test_bad_indexes(value: object, problem: str) -> None:
    with pytest.raises((TypeError, ValueError)) as caught:
        parse_index(value, {})
    assert str(caught.value) == problem


def test_counts() -> None:
    assert parse_count(3) == parse_count("3") == 3
    for value, problem in [("0", "must be at least 1"), ("auto", "'auto' is not an integer")]:
        with pytest.raises(ValueError) as caught:
            parse_count(value)
        assert str(caught.value) == problem


# --- the config section and the flags ----------------------------------------------------------


def write_config(path: Path, url: str = "http://127.0.0.1:9/v1", shard: str = "") -> Path:
    lines = [
        # A budget that polls all 30 messages within a second or two.
        f"api: {{base_url: '{url}', api_key: k, timeout: 5s, max_requests_per_minute: 1900}}",
        "polling:",
        "  schedule: [{until: 1h, every: 1s}]",
        "  settled_recheck: 1s",
        "  final_after: 1h",
        "state: {path: ':memory:'}",
        shard,
        "messages:",
        *(f"  - {{id: '{i}', labels: {{campaign: c{int(i) % 4}}}}}" for i in IDS),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_config_shard_section(tmp_path: Path) -> None:
    config = load_config(
        write_config(tmp_path / "c.yaml", shard="shard: {count: 3, index: 2}"), available()
    )
    assert (config.shard_count, config.shard_index) == (3, 2)
    assert config.shard == Shard(3, 2)
    default = load_config(write_config(tmp_path / "d.yaml"), available())
    assert (default.shard_count, default.shard_index) == (1, 0)
    assert Config("x").shard == Shard.ALL


def test_config_index_auto(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", shard="shard: {count: 3, index: auto}")
    assert load_config(path, available(), {"HOSTNAME": f"{POD}-1"}).shard == Shard(3, 1)


@pytest.mark.parametrize(
    ("shard", "environ", "kind", "key", "problem"),
    [
        ("shard: {count: 0}", {}, e.InvalidValueError, "shard.count", "must be at least 1"),
        (
            "shard: {count: 3, index: 3}",
            {},
            e.InvalidValueError,
            "shard.index",
            "is 3, but must be less than shard.count (3)",
        ),
        (
            "shard: {index: 1}",
            {},
            e.InvalidValueError,
            "shard.index",
            "is 1, but must be less than shard.count (1)",
        ),
        (
            "shard: {count: 3, index: auto}",
            {"HOSTNAME": "exporter"},
            e.InvalidValueError,
            "shard.index",
            "auto: the host name 'exporter' (HOSTNAME) does not end in -<number>,"
            " as StatefulSet pod names (NAME-0, NAME-1, ...) do",
        ),
        (
            "shard: {count: three}",
            {},
            e.InvalidValueError,
            "shard.count",
            "'three' is not an integer",
        ),
        (
            "shard: {count: 2, idx: 1}",
            {},
            e.UnknownKeyError,
            "shard.idx",
            "unknown key (did you mean index?)",
        ),
        ("shard: [3, 1]", {}, e.InvalidTypeError, "shard", "must be a mapping, not a list"),
        (
            "shard: {count: 3, peer_url: 'http://exporter-0:10027'}",
            {},
            e.InvalidValueError,
            "shard.peer_url",
            "must hold {index}, which each shard's number replaces"
            " (e.g. http://mailpartner-exporter-{index}.mailpartner-exporter-shards:10027)",
        ),
        (
            "shard: {count: 3, peer_url: 'ftp://exporter-{index}:10027'}",
            {},
            e.InvalidValueError,
            "shard.peer_url",
            "must be an http:// or https:// URL with a host, for shard 0: 'ftp://exporter-0:10027'",
        ),
        (
            # Formatted for every shard: only the last one's port is out of range.
            "shard: {count: 7, peer_url: 'http://127.0.0.1:6553{index}'}",
            {},
            e.InvalidValueError,
            "shard.peer_url",
            "has no valid port (0 to 65535), for shard 6: 'http://127.0.0.1:65536'",
        ),
        (
            "shard: {count: 3, peer_url: 'http://e-{index}-{zone}:10027'}",
            {},
            e.InvalidValueError,
            "shard.peer_url",
            "must have no spaces, nor braces other than {index}, for shard 0:"
            " 'http://e-0-{zone}:10027'",
        ),
        (
            "shard: {count: 3, peer_url: 'http://e-{index}:10027/?shard=x'}",
            {},
            e.InvalidValueError,
            "shard.peer_url",
            "must not have a query or fragment, for shard 0: 'http://e-0:10027/?shard=x'",
        ),
        (
            # Never echoed: the password stays out of the error.
            "shard: {count: 3, peer_url: 'http://u:s3cret@e-{index}:10027'}",
            {},
            e.InvalidValueError,
            "shard.peer_url",
            "must not hold credentials: a forwarded request carries the client's"
            " Authorization header",
        ),
        (
            "shard: {count: 3, peer_url: 10027}",
            {},
            e.InvalidValueError,
            "shard.peer_url",
            "must be a URL holding {index}, not int",
        ),
    ],
)
def test_config_shard_errors(
    tmp_path: Path,
    shard: str,
    environ: dict[str, str],
    kind: type[e.ConfigError],
    key: str,
    problem: str,
) -> None:
    path = write_config(tmp_path / "c.yaml", shard=shard)
    with pytest.raises(ConfigErrors) as caught:
        load_config(path, available(), environ)
    (error,) = caught.value.errors
    assert type(error) is kind
    assert (error.file, error.key, error.problem) == (str(path), key, problem)


def test_flags_override_the_config(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", shard="shard: {count: 3, index: 0}")

    def load(flags: ShardFlags, environ: dict[str, str] | None = None) -> Config:
        return load_config(path, available(), environ or {}, flags)

    config = load(ShardFlags())
    assert config.shard == Shard(3, 0)
    assert load(ShardFlags(index="2")).shard == Shard(3, 2)
    assert load(ShardFlags("5", "4")).shard == Shard(5, 4)
    auto = load(ShardFlags(index="auto"), {"HOSTNAME": f"{POD}-1"})
    assert auto.shard == Shard(3, 1)
    assert auto.messages == config.messages  # the config keeps every message


@pytest.mark.parametrize(
    ("flags", "environ", "lines"),
    [
        (["--shard.count", "0"], {}, ["command line: --shard.count: must be at least 1"]),
        (
            ["--shard.count=3", "--shard.index=3"],
            {},
            ["command line: --shard.index: is 3, but must be less than --shard.count (3)"],
        ),
        (
            ["--shard.index=1"],
            {},
            ["command line: --shard.index: is 1, but must be less than shard.count (1)"],
        ),
        (
            ["--shard.count=x", "--shard.index=y"],
            {},
            [
                "command line: --shard.count: 'x' is not an integer",
                "command line: --shard.index: 'y' is not an integer or auto",
            ],
        ),
        (
            ["--shard.count=3", "--shard.index=auto"],
            {"HOSTNAME": "exporter"},
            [
                "command line: --shard.index: auto: the host name 'exporter' (HOSTNAME) does not"
                " end in -<number>, as StatefulSet pod names (NAME-0, NAME-1, ...) do"
            ],
        ),
    ],
)
def test_bad_flags_print_like_config_errors_and_exit_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    environ: dict[str, str],
    lines: list[str],
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    path = write_config(tmp_path / "c.yaml")
    for check in (["--config.check"], ["--once"]):
        assert main([*check, "--config.file", str(path), *flags]) == 1
        assert capsys.readouterr().err.splitlines() == lines


def test_a_shrunk_count_names_the_files_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "c.yaml", shard="shard: {count: 3, index: 2}")
    assert main(["--config.check", "--config.file", str(path), "--shard.count=2"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: shard.index: is 2, but must be less than --shard.count (2)"
    ]


def test_config_check_with_index_auto_from_the_pod_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTNAME", f"{POD}-2")
    path = write_config(tmp_path / "c.yaml")
    flags = ["--shard.count=3", "--shard.index=auto"]
    assert main(["--config.check", "--config.file", str(path), *flags]) == 0
    owned = sum(1 for i in IDS if Shard(3, 2).owns(i))
    assert (
        capsys.readouterr().out
        == f"{path}: OK, 30 messages, {owned} in shard 2 of 0..2, sources: bulk_status\n"
    )


# --- the exporter tracks only its shard --------------------------------------------------------


def tracked(exporter: Exporter) -> set[str]:
    messages, _ = exporter.book.snapshot()
    return {m.spec.id for m in messages}


def owned_ids(shard: Shard) -> set[str]:
    return {i for i in IDS if shard.owns(i)}


def test_exporter_tracks_its_shard_and_reload_follows_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", shard="shard: {count: 3, index: 0}")
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    assert tracked(exporter) == owned_ids(Shard(3, 0))
    write_config(path, shard="shard: {count: 3, index: 1}")
    assert exporter.reload() is None
    assert tracked(exporter) == owned_ids(Shard(3, 1))
    write_config(path, shard="shard: {count: 3, index: 7}")
    assert "shard.index: is 7" in (exporter.reload() or "")
    assert tracked(exporter) == owned_ids(Shard(3, 1))  # the old configuration stays
    write_config(path)
    assert exporter.reload() is None
    assert tracked(exporter) == set(IDS)


def test_flags_stay_in_force_across_reloads(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", shard="shard: {count: 3, index: 0}")
    flags = ShardFlags(index="2")
    exporter = Exporter(load_runnable(str(path), False, flags), str(path), shard_flags=flags)
    assert tracked(exporter) == owned_ids(Shard(3, 2))
    write_config(path, shard="shard: {count: 3, index: 1}")
    assert exporter.reload() is None
    assert tracked(exporter) == owned_ids(Shard(3, 2))


def test_demo_sends_are_split_too(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml")
    parts: list[set[str]] = []
    everything: set[str] = set()
    for index in range(2):
        demo = Demo()
        demo.start()
        try:
            flags = ShardFlags("2", str(index))
            config = load_runnable(str(path), demo=True, shard_flags=flags)
            exporter = Exporter(config, str(path), demo, shard_flags=flags)
            parts.append(tracked(exporter))
            everything = {s.id for s in demo.apply(config).messages}
        finally:
            demo.stop()
    assert parts[0].isdisjoint(parts[1])
    assert parts[0] | parts[1] == everything
    assert len(everything) > len(IDS)  # the simulated sends are in it


# --- three shards against one simulator --------------------------------------------------------

Series = tuple[str, tuple[tuple[str, str], ...], float]
# Per-message series that do not depend on when a poll happened.
COMPARED = (
    "mailpartner_message_recipients",
    "mailpartner_message_recipients_by_status",
    "mailpartner_message_cost",
    "mailpartner_message_unsubscribed_recipients",
    "mailpartner_message_last_report_timestamp_seconds",
    "mailpartner_message_final",
    "mailpartner_message_poll_success",
)


def scrape(service: Service) -> list[Series]:
    text = requests.get(f"{service.url}/metrics", timeout=5).text
    return [
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def values(series: list[Series], name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), value) for n, labels, value in series if n == name]


def one(series: list[Series], name: str, **labels: str) -> float:
    (value,) = [v for found, v in values(series, name) if labels.items() <= found.items()]
    return value


def message_ids(series: list[Series]) -> set[str]:
    return {labels["message_id"] for labels, _ in values(series, "mailpartner_message_final")}


def all_final(service: Service, expected: int) -> list[Series] | None:
    """The scrape, once every message the exporter should track is final."""
    series = scrape(service)
    finals = values(series, "mailpartner_message_final")
    if len(finals) == expected and all(value == 1 for _, value in finals):
        return series
    return None


def final_scrape(service: Service, expected: int) -> list[Series]:
    try:
        return wait_until(lambda: all_final(service, expected), 60, f"{service.url}: all final")
    except AssertionError as error:
        log = service.log.read_text().splitlines()[-20:]
        raise AssertionError("\n".join([str(error), "exporter log:", *log])) from None


@pytest.fixture
def simulator() -> Iterator[SimulatorServer]:
    """One simulator, its 30 sends three days old: every report in, nothing changes."""
    with SimulatorServer(World(seed=29), api_key=TEST_KEY) as server:
        sent_at = time.time() - 3 * 86400
        for n, message_id in enumerate(IDS):
            server.world.send(40 + 13 * n, message_id=message_id, sent_at=sent_at)
        yield server


@pytest.mark.e2e
def test_three_shards_poll_each_message_once_and_add_up_to_one_exporter(
    simulator: SimulatorServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", url=simulator.url)
    # The key comes from the environment, as in production: the file's is for other tests.
    data = yaml.safe_load(config.read_text())
    del data["api"]["api_key"]
    config.write_text(yaml.safe_dump(data))
    env = {"MAILPARTNER_API_KEY": TEST_KEY}
    shards = [Shard(3, i) for i in range(3)]
    # Each shard has something to do with these IDs (the hash is fixed, so this is too).
    assert all(owned_ids(shard) for shard in shards)
    flags = [
        ("--shard.count", "3", "--shard.index", "0"),
        ("--shard.count", "3", "--shard.index", "1"),
        ("--shard.count=3", "--shard.index=auto"),  # the third finds its index in its pod name
        (),  # and one exporter for every message
    ]
    envs = [env, env, {**env, "HOSTNAME": f"{POD}-2"}, env]
    # Started side by side: each waits for its own readiness.
    with ThreadPoolExecutor(len(flags)) as pool:
        starting = [
            pool.submit(start_exporter, tmp_path, f"--config.file={config}", *args, env=env)
            for args, env in zip(flags, envs, strict=True)
        ]
    exporters: list[Service] = [f.result() for f in starting if f.exception() is None]
    try:
        assert len(exporters) == len(flags), [f.exception() for f in starting]
        owned = [*map(owned_ids, shards), set(IDS)]
        *parts, whole = [
            final_scrape(service, len(ids)) for service, ids in zip(exporters, owned, strict=True)
        ]
    finally:
        for service in exporters:
            service.stop()

    # Each exporter exposes the messages of its shard; the shards split the 30 between them.
    for shard, part in zip(shards, parts, strict=True):
        assert message_ids(part) == owned_ids(shard)
    assert sum(len(message_ids(part)) for part in parts) == len(IDS)
    assert set().union(*map(message_ids, parts)) == message_ids(whole) == set(IDS)

    # Every message is polled twice by whoever owns it (a poll finds nothing pending, the
    # recheck a second later makes it final): twice by the unsharded exporter, and twice by
    # exactly one shard. A message two shards polled would show 6, one none polled 2.
    assert simulator.stats().polls == dict.fromkeys(IDS, 4)
    requests_total = "mailpartner_api_requests_total"
    for shard, part in zip(shards, parts, strict=True):
        assert one(part, requests_total, endpoint="bulk-status") == 2 * len(owned_ids(shard))
    assert one(whole, requests_total, endpoint="bulk-status") == 2 * len(IDS)

    # The union of the shards' per-message series is the unsharded exporter's, value for value.
    def per_message(series: list[Series]) -> list[Series]:
        return sorted(s for s in series if s[0] in COMPARED)

    union = sorted(s for part in parts for s in per_message(part))
    assert union == per_message(whole)
    assert {name for name, _, _ in union} == set(COMPARED)
    # Totals are per shard: Prometheus adds them up (sum without (instance)), per campaign.
    for campaign in ("c0", "c1", "c2", "c3"):
        for state in ("delivered", "failed", "pending", "unknown"):
            name, by = "mailpartner_recipients_total", {"campaign": campaign, "state": state}
            assert sum(one(p, name, **by) for p in parts) == one(whole, name, **by)
        cost = sum(one(p, "mailpartner_cost_total", campaign=campaign) for p in parts)
        assert cost == pytest.approx(one(whole, "mailpartner_cost_total", campaign=campaign))


# --- shard.peer_url: a registration for another shard goes on to it ----------------------------

PEER_URL = "http://mailpartner-exporter-{index}.mailpartner-exporter-shards:10027"
# Each shard on a loopback address of its own, the same port: 127.0.1.<index>.
LOOPBACK = "127.0.1.{index}"


def owned_by(index: int, count: int = 3, shape: str = "90{:02d}") -> list[str]:
    """Message IDs of shard ``index`` of ``count``, in the order ``shape`` numbers them."""
    return [i for i in map(shape.format, range(100)) if shard_of(i, count) == index]


def shard_config(path: Path, shard: dict[str, object], **extra: object) -> Path:
    document = {
        "api": {"base_url": "http://127.0.0.1:9/v1", "api_key": TEST_KEY},
        "state": {"path": ":memory:"},
        "shard": shard,
        **extra,
    }
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_peer_url_in_the_config(tmp_path: Path) -> None:
    shard = {"count": 3, "index": 1, "peer_url": f" {PEER_URL}/ "}
    config = load_config(shard_config(tmp_path / "c.yaml", shard), available())
    assert config.shard == Shard(3, 1, PEER_URL)
    assert config.shard.peer(2) == (
        "http://mailpartner-exporter-2.mailpartner-exporter-shards:10027"
    )
    assert load_config(shard_config(tmp_path / "d.yaml", {}), available()).shard.peer(0) is None


def test_config_check_formats_the_peer_url_for_the_flags_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard = {"count": 3, "peer_url": "http://127.0.0.1:6553{index}"}  # 65530 to 65532
    path = shard_config(tmp_path / "c.yaml", shard)
    assert main(["--config.check", "--config.file", str(path)]) == 0
    capsys.readouterr()
    assert main(["--config.check", "--config.file", str(path), "--shard.count=7"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: shard.peer_url: has no valid port (0 to 65535), for shard 6:"
        " 'http://127.0.0.1:65536'"
    ]


@contextlib.contextmanager
def serving(
    tmp_path: Path,
    index: int,
    port: int,
    shard: dict[str, object],
    web_config: str | None = None,
) -> Iterator[tuple[Exporter, str]]:
    """An exporter in this process, shard ``index`` on 127.0.1.<index>:``port``."""
    path = shard_config(tmp_path / f"shard-{index}.yaml", {"index": index, **shard})
    exporter = Exporter(load_runnable(str(path), demo=False), str(path))
    host = LOOPBACK.format(index=index)
    server = exporter.serve(f"{host}:{port}", "/metrics", web_config, registration=True)
    try:
        yield exporter, f"http://{host}:{port}/api/v1/messages"
    finally:
        server.shutdown()
        server.server_close()
        for source in exporter.sources.values():
            source.close()


def registered(exporter: Exporter) -> list[str]:
    return [spec.id for spec in exporter.bulk_sources()["bulk_status"].registered()]


@pytest.fixture
def port() -> int:
    """A port free on 127.0.1.0, and so (nearly always) on the other loopback addresses."""
    return free_port(LOOPBACK.format(index=0))


def test_a_registration_goes_on_to_the_shard_that_owns_it(tmp_path: Path, port: int) -> None:
    sharded = {"count": 3, "peer_url": f"http://{LOOPBACK}:{port}"}
    (mine, *_), (theirs, other, *_), (absent, *_) = (owned_by(i) for i in range(3))
    # Shard 2 does not run: its address refuses connections.
    with (
        serving(tmp_path, 0, port, sharded) as (first, url),
        serving(tmp_path, 1, port, sharded) as (owner, owner_url),
    ):
        answer = requests.post(url, json={"id": theirs, "labels": {"campaign": "c"}}, timeout=5)
        assert answer.status_code == 201
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.json()["data"] == {
            "id": theirs,
            "labels": {"campaign": "c"},
            "sent_at": answer.json()["data"]["sent_at"],
            "source": "bulk_status",
        }
        assert (registered(first), registered(owner)) == ([], [theirs])
        assert tracked(owner) == {theirs} and tracked(first) == set()
        # Again, as is: the owner's 200.
        assert (
            requests.post(url, json={"id": theirs, "labels": {"campaign": "c"}}).status_code == 200
        )
        # This shard's own stays here; the owner sends the first shard's on too.
        assert requests.post(url, json={"id": mine}, timeout=5).status_code == 201
        assert requests.post(owner_url, json={"id": other}, timeout=5).status_code == 201
        assert (registered(first), registered(owner)) == ([mine], [theirs, other])
        # GET lists this shard's only.
        listed = requests.get(url, timeout=5).json()["data"]
        assert [m["id"] for m in listed] == [mine]

        gone = requests.delete(f"{url}/{theirs}", timeout=5)
        assert (gone.status_code, gone.json()) == (
            200,
            {"status": "success", "data": {"id": theirs}},
        )
        assert registered(owner) == [other]
        again = requests.delete(f"{url}/{theirs}", timeout=5)
        assert (again.status_code, again.json()["error"]) == (404, "not registered")

        # An ID that needs quoting reaches the owner as it was sent.
        odd = next(i for i in owned_by(1, shape="pct%41/ü{}") if i)
        assert requests.post(url, json={"id": odd}, timeout=5).status_code == 201
        assert registered(owner) == [other, odd]
        quoted = urllib.parse.quote(odd, safe="")
        assert requests.delete(f"{url}/{quoted}", timeout=5).json()["data"] == {"id": odd}

        # The owner is down: 502 at once, naming it; nothing registered anywhere.
        started = time.monotonic()
        down = requests.post(url, json={"id": absent}, timeout=5)
        assert time.monotonic() - started < 2
        assert down.status_code == 502
        assert down.json()["errorType"] == "unavailable"
        assert down.json()["error"].startswith(
            f"message {absent} belongs to shard 2 of 3, which cannot be reached at"
            f" http://127.0.1.2:{port}/api/v1/messages: ConnectionRefusedError"
        )
        assert (registered(first), registered(owner)) == ([mine], [other])


def test_without_peer_url_a_misdirected_registration_is_refused_with_421(
    tmp_path: Path, port: int
) -> None:
    theirs = owned_by(2)[0]
    with serving(tmp_path, 0, port, {"count": 3}) as (exporter, url):
        refused = {
            "status": "error",
            "errorType": "misdirected",
            "error": f"message {theirs} belongs to shard 2 of 3, not to this one (0): send it"
            " there, or set shard.peer_url to have the shards forward it",
        }
        posted = requests.post(url, json={"id": theirs}, timeout=5)
        assert (posted.status_code, posted.json()) == (421, refused)
        deleted = requests.delete(f"{url}/{theirs}", timeout=5)
        assert (deleted.status_code, deleted.json()) == (421, refused)
        assert registered(exporter) == [] and tracked(exporter) == set()

        # A reload brings a peer_url: the next one is forwarded (to a shard that is down).
        path = Path(exporter.holder.config.file)
        sharded = {"index": 0, "count": 3, "peer_url": "http://127.0.1.{index}:{port}"}
        shard_config(path, sharded)  # "{port}" is no URL: the old configuration stays
        assert "shard.peer_url: has no valid port" in (exporter.reload() or "")
        assert requests.post(url, json={"id": theirs}, timeout=5).status_code == 421
        shard_config(path, {**sharded, "peer_url": f"http://{LOOPBACK}:{port}"})
        assert exporter.reload() is None
        assert requests.post(url, json={"id": theirs}, timeout=5).status_code == 502


def test_a_forwarded_registration_is_never_forwarded_again(tmp_path: Path, port: int) -> None:
    """Shards that disagree on the count would send a message back and forth for ever."""
    # Shard 1 of 3 for the first exporter, shard 0 of 2 for the second, started with count 2.
    message = next(i for i in owned_by(1) if shard_of(i, 2) == 0)
    peers = {"peer_url": f"http://{LOOPBACK}:{port}"}
    with (
        serving(tmp_path, 0, port, {"count": 3, **peers}) as (first, url),
        serving(tmp_path, 1, port, {"count": 2, **peers}) as (second, _),
    ):
        answer = requests.post(url, json={"id": message}, timeout=5)
        assert answer.status_code == 421
        assert answer.json()["error"] == (
            f"message {message} belongs to shard 0 of 2, not to shard 1, to which shard 0"
            " forwarded it: do the shards agree on their count and shard.peer_url?"
        )
        assert registered(first) == registered(second) == []


def test_the_client_credentials_go_on_to_the_owner(tmp_path: Path, port: int) -> None:
    web = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(b"s3cret-pass", bcrypt.gensalt(4)).decode()
    web.write_text(f"basic_auth_users:\n  sender: {hashed}\n", encoding="utf-8")
    sharded = {"count": 3, "peer_url": f"http://{LOOPBACK}:{port}"}
    theirs = owned_by(1)[0]
    # Only the owner asks for a password here: what it gets is the client's.
    with (
        serving(tmp_path, 0, port, sharded) as (_, url),
        serving(tmp_path, 1, port, sharded, str(web)) as (owner, _),
    ):
        anonymous = requests.post(url, json={"id": theirs}, timeout=5)
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
        wrong = requests.post(url, json={"id": theirs}, auth=("sender", "nope"), timeout=5)
        assert wrong.status_code == 401
        right = requests.post(url, json={"id": theirs}, auth=("sender", "s3cret-pass"), timeout=5)
        assert right.status_code == 201
        assert registered(owner) == [theirs]


class SlowPeer:
    """A loopback server that takes each request and answers nothing, or a byte at a time."""

    def __init__(self, trickle: bool) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._trickle = trickle
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            connection, _ = self._listener.accept()
            with connection:
                for byte in b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}":
                    if self._stop.wait(0.05):
                        return
                    if self._trickle:
                        connection.sendall(bytes([byte]))

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.mark.parametrize("trickle", [False, True], ids=["silent", "trickling"])
def test_a_slow_owner_is_given_up_on_at_the_timeout(trickle: bool) -> None:
    peer = SlowPeer(trickle)
    try:
        template = f"http://127.0.0.1:{peer.port}/shard-{{index}}"
        app = messages_app(
            lambda: {},
            shard=lambda: Shard(3, 0, template),
            forwarder=Forwarder(timeout=0.5),
        )
        theirs = owned_by(2)[0]
        body = json.dumps({"id": theirs}).encode()
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/api/v1/messages",
            "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": "application/json",
            "wsgi.input": io.BytesIO(body),
        }
        answers: list[str] = []
        started = time.monotonic()
        payload = json.loads(b"".join(app(environ, lambda status, headers: answers.append(status))))
        # Each byte comes within the read timeout: only the deadline on the whole ends it.
        assert time.monotonic() - started < 1.5
        assert answers == ["504 Gateway Timeout"]
        assert payload == {
            "status": "error",
            "errorType": "timeout",
            "error": f"message {theirs} belongs to shard 2 of 3, which did not answer within"
            f" 0.5s at http://127.0.0.1:{peer.port}/shard-2/api/v1/messages",
        }
    finally:
        peer.close()


@pytest.mark.e2e
def test_shards_forward_registrations_and_the_owner_polls_them(
    simulator: SimulatorServer, tmp_path: Path, port: int
) -> None:
    """Three shards on three loopback addresses, the third down; registrations go to the first."""
    config = tmp_path / "config.yaml"
    document = {
        "api": {"base_url": simulator.url, "max_requests_per_minute": 1900},
        "polling": {"schedule": [{"until": "1h", "every": "1s"}]},
        "state": {"path": ":memory:"},
        "shard": {"peer_url": f"http://{LOOPBACK}:{port}"},
    }
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    env = {"MAILPARTNER_API_KEY": TEST_KEY}
    args = (f"--config.file={config}", "--web.enable-registration", "--shard.count=3")
    with ThreadPoolExecutor(2) as pool:
        starting = [
            pool.submit(
                start_exporter,
                tmp_path,
                *args,
                f"--shard.index={index}",
                env=env,
                host=LOOPBACK.format(index=index),
                port=port,
            )
            for index in range(2)
        ]
    exporters = [f.result() for f in starting if f.exception() is None]
    try:
        assert len(exporters) == 2, [f.exception() for f in starting]
        first, owner = exporters
        endpoint = f"{first.url}/api/v1/messages"
        # A message the simulator sent (three days ago: every report is in), owned by shard 1.
        message = next(i for i in IDS if shard_of(i, 3) == 1)
        body = {"id": message, "labels": {"campaign": "forwarded"}}
        answer = requests.post(endpoint, json=body, timeout=5)
        assert answer.status_code == 201, answer.text
        assert answer.json()["data"]["id"] == message

        series = (
            f'mailpartner_message_poll_success{{campaign="forwarded",message_id="{message}"}} 1'
        )
        wait_until(
            lambda: series in requests.get(f"{owner.url}/metrics", timeout=5).text, 10, "polled"
        )
        assert f'message_id="{message}"' not in requests.get(f"{first.url}/metrics", timeout=5).text
        assert set(simulator.stats().polls) == {message}
        lists = [
            requests.get(f"{s.url}/api/v1/messages", timeout=5).json()["data"] for s in exporters
        ]
        assert [[m["id"] for m in listed] for listed in lists] == [[], [message]]

        assert requests.delete(f"{endpoint}/{message}", timeout=5).status_code == 200
        assert requests.get(f"{owner.url}/api/v1/messages", timeout=5).json()["data"] == []

        down = requests.post(endpoint, json={"id": next(i for i in IDS if shard_of(i, 3) == 2)})
        assert down.status_code == 502 and "shard 2 of 3" in down.json()["error"]
    finally:
        for service in exporters:
            service.stop()


@pytest.mark.e2e
def test_the_statefulset_peer_url_names_each_pod_under_the_headless_service() -> None:
    built = deploy.kustomize(deploy.STATEFULSET)
    (statefulset,) = [d for d in built if d["kind"] == "StatefulSet"]
    name, governing = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    (service,) = [d for d in built if d["kind"] == "Service" and d["metadata"]["name"] == governing]
    (http,) = [p for p in service["spec"]["ports"] if p["targetPort"] == "http"]
    template = yaml.safe_load(deploy.configmap(deploy.STATEFULSET))["shard"]["peer_url"]
    shard = Shard(statefulset["spec"]["replicas"], 0, template)
    for ordinal in range(shard.count):
        assert shard.peer(ordinal) == f"http://{name}-{ordinal}.{governing}:{http['port']}"
