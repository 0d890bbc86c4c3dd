"""message_files: globbed YAML/JSON files of messages, re-read when they change, never half."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from exporter.discovery import MAX_FILE_BYTES, DiscoveryStatus, MessageFiles
from exporter.domain import MessageSpec
from tests.conftest import START, FakeClock

FIXTURES = Path(__file__).parent / "discovery"
_mtimes = itertools.count(1_700_000_000 * 10**9, 10**9)


def write(path: Path, content: object) -> Path:
    """Write ``content`` (bytes, text, or a document dumped as JSON or YAML by extension),
    with an mtime no earlier write had: an edit is seen without waiting for the clock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    elif not isinstance(content, bytes):
        dump = json.dumps if path.suffix == ".json" else yaml.safe_dump
        content = dump(content).encode()
    path.write_bytes(content)
    touch(path)
    return path


def touch(path: Path) -> None:
    mtime = next(_mtimes)
    os.utime(path, ns=(mtime, mtime))


def entries(*ids: str) -> list[dict[str, object]]:
    return [{"id": i} for i in ids]


def ids(files: MessageFiles) -> list[str]:
    return [m.id for m in files.messages]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="exporter.discovery")
    return caplog


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == level]


def test_reads_yaml_and_json_files_in_both_forms_relative_to_base_dir(
    tmp_path: Path, clock: FakeClock
) -> None:
    conf = tmp_path / "conf"
    write(
        conf / "messages.d/a.yaml",
        {"messages": [{"id": "1", "labels": {"campaign": "spring"}, "sent_at": START}]},
    )
    write(conf / "messages.d/b.yaml", entries("2", "3"))
    write(conf / "messages.d/c.yaml", "")
    write(conf / "messages.d/d.yaml", "# nothing yet\n")
    write(conf / "messages.d/ignored.json", entries("x"))
    write(tmp_path / "elsewhere/e.json", {"messages": entries("4")})
    write(tmp_path / "elsewhere/f.json", [{"id": 5, "sent_at": "2026-11-26T10:00:00Z"}])
    write(tmp_path / "elsewhere/g.json", " \n")
    # The working directory (tmp_path) has the same layout: relative globs must not see it.
    write(tmp_path / "messages.d/z.yaml", entries("cwd"))
    files = MessageFiles(
        ["messages.d/*.yaml", str(tmp_path / "elsewhere/*.json")], str(conf), clock
    )

    assert files.snapshot() == DiscoveryStatus(0, 0, 0, 0, None, ())
    assert files.refresh() is True
    assert files.messages == (
        MessageSpec("1", MappingProxyType({"campaign": "spring"}), START),
        MessageSpec("2"),
        MessageSpec("3"),
        MessageSpec("4"),
        MessageSpec("5", sent_at=START),
    )
    assert files.snapshot() == DiscoveryStatus(7, 5, 0, 0, START, ())
    clock.advance(30)
    assert files.refresh() is False
    assert files.snapshot().last_refresh == START + 30


def test_new_files_are_picked_up_and_deleted_ones_take_their_messages_away(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    a = write(tmp_path / "messages.d/a.yaml", entries("1", "2"))
    files = MessageFiles(["messages.d/*.yaml"], str(tmp_path))
    assert files.refresh() is True
    assert ids(files) == ["1", "2"]

    write(tmp_path / "messages.d/b.yaml", entries("3"))
    assert files.refresh() is True
    assert ids(files) == ["1", "2", "3"]
    assert files.snapshot().files == 2

    a.unlink()
    assert files.refresh() is True
    assert ids(files) == ["3"]
    assert files.snapshot().files == 1
    [gone] = records(logs, logging.INFO)
    assert gone.getMessage() == "message file gone; dropping its messages"
    assert (gone.file, gone.messages) == (str(a), 2)  # type: ignore[attr-defined]


def test_an_edited_file_changes_its_messages(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", entries("301", "302"))
    files = MessageFiles(["*.json"], str(tmp_path))
    files.refresh()
    # Same size, same inode: only the mtime tells.
    write(path, entries("301", "303"))
    assert files.refresh() is True
    assert ids(files) == ["301", "303"]
    assert files.refresh() is False


BAD_FILES = {
    "bad_syntax.yaml": "line 4, column 7: did not find expected ',' or '}'",
    "bad_label_name.yaml": "messages[1].labels.bad-name: is not a valid Prometheus label name"
    " ([a-zA-Z_][a-zA-Z0-9_]*)",
    "messages_not_a_list.yaml": "messages: must be a list, not a string",
    "not_messages.yaml": "must be a list of messages or a mapping with a messages list",
    "unknown_key.yaml": "message: unknown key (a message file holds only messages)",
    "duplicate_key.yaml": "line 2, column 3: key 'id' appears twice",
    "duplicate_id.yaml": "[2].id: message '301' is already listed at [0]",
    "bad_sent_at.json": "messages[0].sent_at: 'yesterday' is not an RFC 3339 time such as"
    " 2026-11-26T10:00:00Z",
    "bad_syntax.json": "line 1, column 15: Expecting property name enclosed in double quotes",
    "duplicate_key.json": "key 'a' appears twice",
}


@pytest.mark.parametrize(("fixture", "problem"), BAD_FILES.items(), ids=list(BAD_FILES))
def test_a_bad_file_keeps_its_previous_messages_until_fixed(
    tmp_path: Path, logs: pytest.LogCaptureFixture, fixture: str, problem: str
) -> None:
    path = write(tmp_path / f"messages.d/m{Path(fixture).suffix}", entries("1", "2"))
    files = MessageFiles(["messages.d/*"], str(tmp_path))
    files.refresh()

    write(path, (FIXTURES / fixture).read_bytes())
    assert files.refresh() is False
    assert files.refresh() is False
    assert ids(files) == ["1", "2"]
    error = f"{path}: {problem}"
    assert files.snapshot() == DiscoveryStatus(
        1, 2, 0, 1, files.snapshot().last_refresh, ((str(path), error),)
    )
    [warning] = records(logs, logging.WARNING)
    assert warning.getMessage() == "message file not loaded; keeping its previous messages"
    assert (warning.file, warning.err, warning.kept) == (str(path), error, 2)  # type: ignore[attr-defined]

    write(path, entries("3"))
    assert files.refresh() is True
    assert ids(files) == ["3"]
    assert files.snapshot().problems == ()
    assert files.snapshot().errors_total == 1
    [fixed] = records(logs, logging.INFO)
    assert fixed.getMessage() == "message file fixed; using its new content"
    assert (fixed.file, fixed.messages) == (str(path), 1)  # type: ignore[attr-defined]


def test_a_file_bad_from_the_start_adds_nothing(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", entries("1"))
    shutil.copy(FIXTURES / "bad_label_name.yaml", tmp_path / "b.yaml")
    files = MessageFiles(["*.yaml"], str(tmp_path))
    assert files.refresh() is True
    assert ids(files) == ["1"]
    assert [path for path, _ in files.snapshot().problems] == [str(tmp_path / "b.yaml")]


def test_a_dangling_symlink_is_one_error_not_one_per_refresh(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").symlink_to(tmp_path / "missing.yaml")
    files = MessageFiles(["*.yaml"], str(tmp_path))
    files.refresh()
    files.refresh()
    path = str(tmp_path / "m.yaml")
    assert files.snapshot().problems == ((path, f"{path}: cannot read: No such file or directory"),)
    assert files.snapshot().errors_total == 1


def test_dotfiles_and_tmp_files_are_never_read_and_a_directory_is_a_problem(
    tmp_path: Path,
) -> None:
    write(tmp_path / "messages.d/m.yaml", entries("1"))
    write(tmp_path / "messages.d/.m.yaml.swp", entries("2"))
    write(tmp_path / "messages.d/m.yaml.tmp", entries("3"))
    (tmp_path / "messages.d/archive").mkdir()
    files = MessageFiles(["messages.d/*"], str(tmp_path))
    files.refresh()
    assert ids(files) == ["1"]
    directory = str(tmp_path / "messages.d/archive")
    assert files.snapshot().problems == ((directory, f"{directory}: is not a regular file"),)
    assert files.snapshot().files == 2


@pytest.mark.parametrize("created_first", ["a", "b"])
def test_an_id_in_two_files_comes_from_the_first_path(
    tmp_path: Path, logs: pytest.LogCaptureFixture, created_first: str
) -> None:
    content = {"a": [{"id": "7", "labels": {"from": "a"}}], "b": [{"id": "7"}, {"id": "8"}]}
    second = "b" if created_first == "a" else "a"
    for name in (created_first, second):
        write(tmp_path / f"{name}.yaml", content[name])
    files = MessageFiles(["*.yaml"], str(tmp_path))
    files.refresh()
    files.refresh()
    assert files.messages == (MessageSpec("7", MappingProxyType({"from": "a"})), MessageSpec("8"))
    assert files.snapshot().duplicates == 1
    assert files.snapshot().messages == 2
    [warning] = records(logs, logging.WARNING)
    assert warning.getMessage() == (
        "message ID in more than one message file; the first file's entry wins"
    )
    assert (warning.message_id, warning.file, warning.ignored_file) == (  # type: ignore[attr-defined]
        "7",
        str(tmp_path / "a.yaml"),
        str(tmp_path / "b.yaml"),
    )

    (tmp_path / "a.yaml").unlink()
    files.refresh()
    assert files.messages == (MessageSpec("7"), MessageSpec("8"))
    assert files.snapshot().duplicates == 0


def test_many_duplicates_are_summed_up_in_the_log(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    many = entries(*(str(i) for i in range(25)))
    write(tmp_path / "a.json", many)
    write(tmp_path / "b.json", many)
    files = MessageFiles(["*.json"], str(tmp_path))
    files.refresh()
    assert files.snapshot().duplicates == 25
    warnings = records(logs, logging.WARNING)
    assert len(warnings) == 11
    assert warnings[-1].count == 15  # type: ignore[attr-defined]


def test_an_atomically_replaced_file_is_always_seen_whole(tmp_path: Path) -> None:
    versions = [
        json.dumps(entries(*(f"{v}-{i}" for i in range(500)))).encode() for v in ("old", "new")
    ]
    whole = [{f"{v}-{i}" for i in range(500)} for v in ("old", "new")]
    target = tmp_path / "messages.d/m.json"
    write(target, versions[0])
    files = MessageFiles(["messages.d/*"], str(tmp_path))  # the writer's temp file matches too
    files.refresh()
    done = threading.Event()
    last = [0]

    def writer() -> None:
        temp = tmp_path / "messages.d/.m.json.partial"
        for n in itertools.count(1):
            if done.is_set():
                return
            last[0] = n % 2
            with temp.open("wb") as f:
                # Two writes: a reader of the temp file would see half a file.
                data = versions[n % 2]
                f.write(data[: len(data) // 2])
                f.write(data[len(data) // 2 :])
            os.replace(temp, target)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    try:
        for _ in range(2000):
            files.refresh()
            seen.append({m.id for m in files.messages})
            if len(seen) >= 300 and whole[0] in seen and whole[1] in seen:
                break
    finally:
        done.set()
        thread.join()
    assert all(s in whole for s in seen)
    assert whole[0] in seen
    assert whole[1] in seen
    assert files.snapshot().errors_total == 0
    # What was read is what was recorded as read: the last version is not missed.
    files.refresh()
    assert {m.id for m in files.messages} == whole[last[0]]


class RacedFiles(MessageFiles):
    """A writer replaces the file just after each open: the read gets the old one."""

    def __init__(self, patterns: list[str], base_dir: str, replacements: list[bytes]) -> None:
        super().__init__(patterns, base_dir)
        self.replacements = replacements

    def _open(self, path: str) -> BinaryIO:
        opened = super()._open(path)
        if self.replacements:
            temp = Path(path).with_name(".replacement")
            write(temp, self.replacements.pop(0))
            os.replace(temp, path)
        return opened


def test_a_file_replaced_while_being_read_is_read_again(tmp_path: Path) -> None:
    path = write(tmp_path / "m.yaml", entries("1"))
    files = RacedFiles(["*.yaml"], str(tmp_path), [yaml.safe_dump(entries("2")).encode()])
    files.refresh()
    assert ids(files) == ["1"]
    # What was recorded is the opened file's (mtime, size, inode), not the new one's.
    files.refresh()
    assert ids(files) == ["2"]
    assert path.read_text() == yaml.safe_dump(entries("2"))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_half_written_file_keeps_the_previous_messages_until_complete(
    tmp_path: Path, suffix: str
) -> None:
    path = write(tmp_path / f"m{suffix}", entries("1", "2"))
    files = MessageFiles([f"*{suffix}"], str(tmp_path))
    files.refresh()
    # JSON is YAML too; flow style, so that any cut breaks it.
    data = json.dumps(entries(*(str(i) for i in range(10, 60)))).encode()

    with path.open("r+b") as f:
        f.truncate()
        f.write(data[: len(data) // 2])
    touch(path)
    assert files.refresh() is False
    assert ids(files) == ["1", "2"]
    assert files.snapshot().errors_total == 1

    with path.open("ab") as f:
        f.write(data[len(data) // 2 :])
    touch(path)
    assert files.refresh() is True
    assert ids(files) == [str(i) for i in range(10, 60)]
    assert files.snapshot().problems == ()


class CountingFiles(MessageFiles):
    """Counts reads; refuses them, as a mode 000 file would for a non-root user, when told."""

    def __init__(self, patterns: list[str], base_dir: str) -> None:
        super().__init__(patterns, base_dir)
        self.opened: list[str] = []
        self.refuse = False

    def _open(self, path: str) -> BinaryIO:
        self.opened.append(Path(path).name)
        if self.refuse:
            raise PermissionError(13, "Permission denied")
        return super()._open(path)


def test_unchanged_files_are_not_read_again(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "a.yaml", entries("1"))
    write(tmp_path / "b.yaml", entries("2"))
    shutil.copy(FIXTURES / "bad_syntax.yaml", tmp_path / "c.yaml")
    files = CountingFiles(["*.yaml"], str(tmp_path))
    for _ in range(3):
        files.refresh()
    assert sorted(files.opened) == ["a.yaml", "b.yaml", "c.yaml"]
    assert files.snapshot().errors_total == 1
    assert len(records(logs, logging.WARNING)) == 1

    touch(tmp_path / "b.yaml")
    files.refresh()
    assert sorted(files.opened) == ["a.yaml", "b.yaml", "b.yaml", "c.yaml"]


def test_a_file_made_readable_again_is_read_though_its_mtime_did_not_change(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "m.yaml", entries("1"))
    files = CountingFiles(["*.yaml"], str(tmp_path))
    files.refresh()
    write(path, entries("2"))
    files.refuse = True
    files.refresh()
    assert ids(files) == ["1"]
    assert files.snapshot().problems == ((str(path), f"{path}: cannot read: Permission denied"),)

    files.refuse = False
    files.refresh()
    assert ids(files) == ["1"]  # unchanged: not tried again

    # chmod changes only the ctime, which the kernel takes from a coarse clock: repeat
    # it until that clock has ticked past the write's.
    before = path.stat().st_ctime_ns
    while path.stat().st_ctime_ns == before:
        path.chmod(0o644)
    files.refresh()
    assert ids(files) == ["2"]
    assert files.snapshot().problems == ()


def test_a_file_over_16_mib_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", entries("1"))
    files = MessageFiles(["*.json"], str(tmp_path))
    files.refresh()

    data = json.dumps(entries("2")).encode()
    write(path, data + b" " * (MAX_FILE_BYTES - len(data)))
    files.refresh()
    assert ids(files) == ["2"]

    with path.open("ab") as f:
        f.write(b" ")
    touch(path)
    files.refresh()
    assert ids(files) == ["2"]
    assert files.snapshot().problems == ((str(path), f"{path}: larger than 16 MiB; not read"),)
    assert files.snapshot().errors_total == 1


def test_exposition(tmp_path: Path, clock: FakeClock) -> None:
    write(tmp_path / "a.yaml", entries("1", "2"))
    write(tmp_path / "b.yaml", entries("2", "3"))
    shutil.copy(FIXTURES / "bad_syntax.yaml", tmp_path / "c.yaml")
    files = MessageFiles(["*.yaml"], str(tmp_path), clock)
    files.refresh()
    registry = CollectorRegistry()
    registry.register(files)
    assert generate_latest(registry).decode() == (
        "# HELP mailpartner_exporter_message_files Files matched by the message_files globs,"
        " usable or not.\n"
        "# TYPE mailpartner_exporter_message_files gauge\n"
        "mailpartner_exporter_message_files 3.0\n"
        "# HELP mailpartner_exporter_message_file_errors_total Message files that could not be"
        " used (each keeps its previous messages).\n"
        "# TYPE mailpartner_exporter_message_file_errors_total counter\n"
        "mailpartner_exporter_message_file_errors_total 1.0\n"
        "# HELP mailpartner_exporter_message_file_duplicates Message file entries ignored"
        " because a file earlier in path order lists the ID.\n"
        "# TYPE mailpartner_exporter_message_file_duplicates gauge\n"
        "mailpartner_exporter_message_file_duplicates 1.0\n"
        "# HELP mailpartner_exporter_discovered_messages Messages read from the"
        " message_files.\n"
        "# TYPE mailpartner_exporter_discovered_messages gauge\n"
        "mailpartner_exporter_discovered_messages 3.0\n"
    )
