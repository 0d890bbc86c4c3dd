"""Config parsing: one YAML file per kind of mistake, each with the exact message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from exporter.cli import main
from exporter.config import convert
from exporter.config import errors as e
from exporter.config.duration import format_duration, parse_duration
from exporter.config.errors import ConfigErrors
from exporter.config.loader import load_config
from exporter.domain import State
from exporter.sources.registry import available

CONFFILES = Path(__file__).parent / "conffiles"
REPO = Path(__file__).parent.parent

# file -> (exception class, key path, problem)
CASES = {
    "unknown_key": (
        e.UnknownKeyError,
        "api.max_request_per_minute",
        "unknown key (did you mean max_requests_per_minute?)",
    ),
    "unknown_top_key": (e.UnknownKeyError, "mesages", "unknown key (did you mean messages?)"),
    "unknown_source": (
        e.UnknownKeyError,
        "sources.acount",
        "unknown source (did you mean account? installed: account, bulk_status,"
        " smspartner_bulk_status)",
    ),
    "bad_source_option": (
        e.InvalidDurationError,
        "sources.account.every",
        "'soon' is not a duration (use e.g. 30s, 2m, 1h30m, 7d)",
    ),
    "unknown_source_option": (
        e.UnknownKeyError,
        "sources.account.evry",
        "unknown key (did you mean every?)",
    ),
    "bad_threshold": (
        e.InvalidValueError,
        "sources.account.low_credits.creditMail",
        "must be a number, not a string",
    ),
    "bad_message_files": (e.InvalidTypeError, "message_files", "must be a list of file globs"),
    "bad_sms_api": (
        e.InvalidValueError,
        "sources.smspartner_bulk_status.api.base_url",
        "must be an http:// or https:// URL",
    ),
    "bad_state_path": (
        e.InvalidValueError,
        "state.path",
        "must be a file path, or :memory: to keep no state",
    ),
    "bad_duration": (
        e.InvalidDurationError,
        "api.timeout",
        "'10 seconds' is not a duration (use e.g. 30s, 2m, 1h30m, 7d)",
    ),
    "bad_schedule_duration": (
        e.InvalidDurationError,
        "polling.schedule[1].every",
        "'2x' is not a duration (use e.g. 30s, 2m, 1h30m, 7d)",
    ),
    "schedule_not_increasing": (
        e.ScheduleOrderError,
        "polling.schedule[1].until",
        "must be greater than the previous step's until",
    ),
    "schedule_missing_every": (e.MissingKeyError, "polling.schedule[0].every", "is required"),
    "schedule_empty": (
        e.InvalidTypeError,
        "polling.schedule",
        "must be a non-empty list of {until, every}",
    ),
    "final_before_schedule": (
        e.InvalidValueError,
        "polling.final_after",
        "is before the last schedule step's until; that step would never run",
    ),
    "bad_label_name": (
        e.LabelNameError,
        "messages[0].labels.campaign-name",
        "is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)",
    ),
    "reserved_label": (
        e.LabelNameError,
        "messages[0].labels.state",
        "shadows a label the exporter or Prometheus sets itself; choose another name",
    ),
    "dunder_label": (
        e.LabelNameError,
        "messages[0].labels.__name__",
        "names starting with __ are reserved",
    ),
    "duplicate_message": (
        e.DuplicateMessageError,
        "messages[2].id",
        "message '300' is already listed at messages[0]",
    ),
    "missing_id": (e.MissingKeyError, "messages[0].id", "is required"),
    "bad_transactional_labels": (
        e.InvalidTypeError,
        "polling.transactional_labels.campaign",
        "must be a list of label values",
    ),
    "sent_at_in_milliseconds": (
        e.InvalidValueError,
        "messages[0].sent_at",
        "1764151200000 is not a time between 2000 and 2100 (epoch seconds or RFC 3339)",
    ),
    "too_many_labels": (
        e.InvalidValueError,
        "messages[0].labels",
        "has 11 labels; a message takes at most 10",
    ),
    "long_label_value": (
        e.InvalidValueError,
        "messages[0].labels.campaign",
        "is 129 characters long; label values take at most 128",
    ),
    "bad_sent_at": (
        e.InvalidValueError,
        "messages[0].sent_at",
        "'yesterday' is not an RFC 3339 time such as 2026-11-26T10:00:00Z",
    ),
    "unset_env": (
        e.SecretError,
        "api.api_key",
        "environment variable MAILPARTNER_TEST_UNSET_VARIABLE is not set",
    ),
    "missing_key_file": (
        e.SecretError,
        "api.api_key_file",
        "cannot read does-not-exist.key: No such file or directory",
    ),
    "both_keys": (
        e.InvalidValueError,
        "api.api_key",
        "set either api.api_key or api.api_key_file, not both",
    ),
    "bad_concurrency": (e.InvalidValueError, "api.concurrency", "must be at least 1"),
    "bad_format": (e.InvalidValueError, "api.format", "must be one of json, xml"),
    "bad_base_url": (e.InvalidValueError, "api.base_url", "must be an http:// or https:// URL"),
    "status_twice": (
        e.InvalidValueError,
        "status_map.delivered",
        "status 'ko' is also in the default list of failed; set status_map.failed without it",
    ),
    "messages_not_list": (e.InvalidTypeError, "messages", "must be a list, not a mapping"),
    "yaml_syntax": (
        e.SyntaxConfigError,
        "",
        "line 3, column 2: did not find expected key",
    ),
    "duplicate_yaml_key": (
        e.SyntaxConfigError,
        "",
        "line 3, column 3: key 'timeout' appears twice",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_bad_file_gives_one_error_naming_file_key_and_problem(name: str) -> None:
    kind, key, problem = CASES[name]
    path = CONFFILES / f"{name}.yaml"
    with pytest.raises(ConfigErrors) as caught:
        load_config(path, available(), environ={})
    assert len(caught.value.errors) == 1, str(caught.value)
    error = caught.value.errors[0]
    assert type(error) is kind
    assert (error.file, error.key, error.problem) == (str(path), key, problem)
    assert str(error) == (f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


def test_every_conffile_has_a_case() -> None:
    files = {p.stem for p in CONFFILES.glob("*.yaml")} - {"many_errors"}
    assert files == set(CASES)


def test_config_check_prints_every_error_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    path = CONFFILES / "many_errors.yaml"
    assert main(["--config.check", "--config.file", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: api.colour: unknown key",
        f"{path}: api.timeout: 'soon' is not a duration (use e.g. 30s, 2m, 1h30m, 7d)",
        f"{path}: polling.retention: 'forever' is not a duration (use e.g. 30s, 2m, 1h30m, 7d)",
        f"{path}: messages[0].labels.bad-name: is not a valid Prometheus label name"
        " ([a-zA-Z_][a-zA-Z0-9_]*)",
        f"{path}: messages[1].id: message '300' is already listed at messages[0]",
    ]


def test_config_check_passes_the_shipped_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILPARTNER_API_KEY", "example-key")
    assert main(["--config.check", "--config.file", str(REPO / "config.yaml")]) == 0
    assert (
        capsys.readouterr().out
        == f"{REPO / 'config.yaml'}: OK, 2 messages (2 in the config, 0 in 0 message files),"
        " sources: bulk_status, account\n"
    )


def test_config_check_without_any_key_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAILPARTNER_API_KEY", raising=False)
    assert main(["--config.check", "--config.file", str(REPO / "config.yaml")]) == 1
    assert "no API key" in capsys.readouterr().err


def test_shipped_example_values() -> None:
    config = load_config(REPO / "config.yaml", available(), environ={})
    assert config.api.timeout == 10
    assert config.api.max_requests_per_minute == 600
    assert [(s.until, s.every) for s in config.polling.schedule] == [
        (120, 20),
        (720, 120),
        (3600, 480),
        (10800, 1800),
        (43200, 10800),
        (172800, 43200),
    ]
    assert config.polling.retention == 7 * 86400
    assert config.status_map.state_of("NOT DELIVERED") is State.FAILED
    assert config.status_map.state_of("Sent") is State.UNKNOWN
    assert [(m.id, dict(m.labels)) for m in config.messages] == [
        ("300", {"campaign": "newsletter-2026-11"}),
        ("301", {"campaign": "welcome"}),
    ]


def test_key_from_env_reference_file_and_default_variable(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("file-key\n")
    (tmp_path / "a.yaml").write_text("api: {api_key: 'pre-${K}-post'}\n")
    (tmp_path / "b.yaml").write_text("api: {api_key_file: key.txt}\n")  # relative to the file
    (tmp_path / "c.yaml").write_text("api: {}\n")
    assert (
        load_config(tmp_path / "a.yaml", available(), {"K": "env"}).api.api_key.reveal()
        == "pre-env-post"
    )
    assert load_config(tmp_path / "b.yaml", available(), {}).api.api_key.reveal() == "file-key"
    config = load_config(tmp_path / "c.yaml", available(), {"MAILPARTNER_API_KEY": "default-var"})
    assert config.api.api_key.reveal() == "default-var"
    assert "default-var" not in repr(config)
    assert load_config(tmp_path / "c.yaml", available(), {}).api.api_key is None


def test_messages_accept_numbers_and_times(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "messages:\n"
        "  - {id: 300, sent_at: 2026-11-26T10:00:00Z, labels: {batch: 7, b: true}}\n"
        "  - {id: '301', sent_at: '2026-11-26T11:00:00+01:00'}\n"
        "  - {id: '302', sent_at: 1795687200}\n"
    )
    messages = load_config(tmp_path / "m.yaml", available(), {}).messages
    assert [(m.id, m.sent_at) for m in messages] == [
        ("300", 1795687200.0),
        ("301", 1795687200.0),
        ("302", 1795687200.0),
    ]
    assert dict(messages[0].labels) == {"b": "true", "batch": "7"}


def test_rate_above_upstream_limit_is_allowed_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("api: {max_requests_per_minute: 2500}\n")
    config = load_config(tmp_path / "r.yaml", available(), {})
    assert config.api.max_requests_per_minute == 2500
    assert "above Mail Partner's limit of 2000" in config.warnings[0]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("2m", 120), ("1h30m", 5400), ("7d", 604800), ("500ms", 0.5), ("1w", 604800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["30", "s", "1x", "30s1m", "1m1m", "-1s", "", " 1s"])
def test_not_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


YAML_CASES = [
    "",
    "# only a comment\n",
    "a: 1\nb: 1.5\nc: true\nd: no\ne: null\nf: ~\ng: 2026-11-26\nh: 2026-11-26T10:00:00Z\n",
    "messages:\n  - {id: '300', labels: {campaign: x}}\n  - id: 301\n    sent_at: 1795687200\n",
    "- [1, 2, [3, {x: y}]]\n- 'quoted: #'\n- \"esc\\t\"\n- !!str 12\n- !!int '7'\n",
    "base: &b {x: 1}\nother: *b\n",  # anchors and aliases: the node-based loader
    "base: &b {x: 1}\nmerged: {<<: *b, y: 2}\n",  # a merge key
    "s: !!set {a, b}\n",  # an explicit collection tag
    "a: 1\n---\nb: 2\n",  # two documents: refused as the node-based loader refuses them
    "a: 1\nb: {c: 2, c: 3}\n",  # a key twice
    "x: !custom 1\n",  # a tag nobody constructs
    "a: [1, 2\n",  # not valid YAML
    "? [1, 2]\n: x\n",  # a list as a key
]


@pytest.mark.parametrize("text", YAML_CASES)
def test_yaml_read_from_events_is_what_the_node_based_loader_reads(text: str) -> None:
    """Config, message files and the web config are read from the parser's events (no tree
    of nodes, for memory); the outcome must be the loader's own, value or error."""

    def outcome(load: Callable[[], object]) -> object:
        try:
            return ("value", load())
        except ConfigErrors as e:
            return ("error", str(e))

    def reference() -> object:
        try:
            return yaml.load(text, Loader=convert.UniqueKeyLoader)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(err, "problem", None) or "not valid YAML"
            raise ConfigErrors([e.SyntaxConfigError("f.yaml", "", f"{where}{problem}")]) from None

    assert outcome(lambda: convert.load_yaml(text, "f.yaml")) == outcome(reference)
