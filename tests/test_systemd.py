"""The README's systemd steps, run as written on Debian 12 booted under systemd in a podman
container: the exporter starts from the venv in /opt/mailpartner-exporter with its key from the
credential, answers /-/ready, reloads on `systemctl reload` (without procps: no /bin/kill),
stops cleanly and finds its state again after a restart.

The steps are the ```sh block(s) of README.md's systemd paragraph, run in a copy of this
working tree (what a clone would hold once committed) at /root/mailpartner-exporter. Only what
must differ from a real install is substituted: the config's base_url (the project's simulator
in the same container) and the key. The machine is deploy/docker/smoke-test.sh's base image
(a Debian 12 minbase) with systemd added, cached under a tag naming its recipe.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import require, require_tool

# The image is built on a cold machine: apt-get on top of the 120 s default.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
UNIT = REPO / "deploy/systemd/mailpartner-exporter.service"
SERVICE = UNIT.stem
CONFIG = "deploy/systemd/config.yaml"  # what the steps install, as a clone path
REAL_API = "https://api.mailpartner.fr/v1"
BASE_IMAGE = "docker.io/library/python:3.11-slim"  # as deploy/docker/smoke-test.sh leaves it
CLONE = "/root/mailpartner-exporter"  # where root would `git clone` it
SIMULATOR = "127.0.0.1:10028"
KEY = "systemd-steps-key"  # the simulator takes this one only; the steps read it from $KEY
EXPORTER = "http://127.0.0.1:10027"  # the unit passes no --web.listen-address
CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
# Debian 12 booting systemd, without procps (no /bin/kill) and without python3-venv, which the
# README's steps install. The package lists stay, as on an installed system.
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
      systemd systemd-sysv >/dev/null \\
 && apt-get purge -y -qq --autoremove python3-venv python3.11-venv >/dev/null \\
 && test ! -e /bin/kill
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
"""
# GET argv[1] inside the machine (no curl there), retrying refusals for argv[2] seconds.
FETCH = """\
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as answer:
            sys.stdout.write(answer.read().decode())
            break
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit(f"{sys.argv[1]}: {e}")
        time.sleep(0.2)
"""


def podman(
    *args: str, timeout: float = 120, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    # What Debian 12's podman 4.3 needs on a VM, unless the caller says otherwise.
    conf = os.environ.get("CONTAINERS_CONF", str(REPO / "deploy/docker/containers.conf"))
    result = subprocess.run(
        ["podman", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "CONTAINERS_CONF": conf},
    )
    return subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )


def readme_steps() -> str:
    """The ```sh blocks of README.md's **systemd.** paragraph, as one script."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^\*\*systemd\.\*\*(.*?)(?=^\*\*[^*\n]+\.\*\*|^#)", text, re.M | re.S)
    assert section, "README.md has no **systemd.** paragraph"
    blocks = re.findall(r"^```sh\n(.*?)^```$", section[1], re.M | re.S)
    assert blocks, "README.md's systemd paragraph has no ```sh block of install steps"
    return "".join(blocks)


def unit_setting(key: str) -> str:
    (value,) = re.findall(rf"^{key}=(.*)$", UNIT.read_text(encoding="utf-8"), flags=re.M)
    return str(value)


def clone_archive() -> bytes:
    """This working tree's files a clone would have (tracked, and new ones not ignored), with
    the systemd config pointed at the simulator."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name in sorted(filter(None, listed.split("\0"))):
            path = REPO / name
            if not path.is_file():  # deleted in the working tree
                continue
            if name != CONFIG:
                tar.add(path, arcname=name)
                continue
            text = path.read_text(encoding="utf-8")
            assert text.count(REAL_API) == 1, f"{CONFIG} names {REAL_API} once"
            data = text.replace(REAL_API, f"http://{SIMULATOR}/v1").encode()
            info = tar.gettarinfo(path, arcname=name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive.getvalue()


def machine_image(context: Path) -> str:
    """The systemd image, built once per recipe and base image (``context``: an empty folder)."""
    base = podman("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE)
    require(
        base.returncode == 0,
        f"no image {BASE_IMAGE}: make it with `bash deploy/docker/smoke-test.sh` (.ci/run does)",
    )
    recipe = hashlib.sha256((CONTAINERFILE + base.stdout).encode()).hexdigest()[:16]
    image = f"localhost/mailpartner-exporter-systemd-test:{recipe}"
    if podman("image", "exists", image).returncode != 0:
        (context / "Containerfile").write_text(CONTAINERFILE, encoding="utf-8")
        built = podman("build", "-q", "--format", "docker", "-t", image, str(context), timeout=300)
        assert built.returncode == 0, built.stderr
    return image


class Machine:
    """A booted container: commands run in it as root, systemd's answers read back."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(
        self,
        *argv: str,
        stdin: bytes | None = None,
        options: tuple[str, ...] = (),
        timeout: float = 60,
    ) -> str:
        """``argv``'s output; ``options`` go to `podman exec` (a folder, variables)."""
        if stdin is not None:
            options += ("--interactive",)
        result = podman("exec", *options, self.name, *argv, stdin=stdin, timeout=timeout)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{argv[:3]} exited {result.returncode}:\n{output[-3000:]}"
        return result.stdout

    def wait_for_boot(self, timeout: float = 60) -> None:
        """Until systemd says the boot is over: running, or degraded (a unit failed)."""
        deadline = time.monotonic() + timeout
        while True:
            # --wait waits for the boot, but not for systemd to listen: until then "Failed to
            # connect to bus".
            state = podman("exec", self.name, "systemctl", "is-system-running", "--wait")
            if state.stdout.strip() in {"running", "degraded"}:
                return
            assert time.monotonic() < deadline, f"not booted: {state.stdout}{state.stderr}"
            time.sleep(0.2)

    def show(self, *properties: str) -> dict[str, str]:
        text = self.run("systemctl", "show", "--property=" + ",".join(properties), SERVICE)
        return dict(line.split("=", 1) for line in text.splitlines())

    def journal(self, invocation: str | None = None) -> str:
        """The service's log lines: one start of it (``InvocationID``), or every one."""
        match = f"_SYSTEMD_INVOCATION_ID={invocation}" if invocation else f"--unit={SERVICE}"
        return self.run("journalctl", "--no-pager", "--output=cat", match)

    def fetch(self, path: str, wait: float = 30) -> str:
        """The exporter's answer at ``path``, once it answers 2xx; the journal if it never does."""
        answer = podman("exec", self.name, "python3", "-c", FETCH, EXPORTER + path, str(wait))
        assert answer.returncode == 0, f"{answer.stderr}{self.journal()[-3000:]}"
        return answer.stdout


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    require_tool("podman")
    require(shutil.which("git") is not None and (REPO / ".git").exists(), "no git checkout")
    image = machine_image(tmp_path)
    name = f"mpe-systemd-test-{os.getpid()}"
    started = podman("run", "-d", "--name", name, "--systemd=always", image)
    try:
        assert started.returncode == 0, started.stderr
        machine = Machine(name)
        machine.wait_for_boot()
        yield machine
    finally:
        podman("rm", "-f", "-t", "0", name)


@pytest.fixture
def steps() -> str:
    """Read before a machine boots: a README without them fails at once."""
    script = readme_steps()
    # The config whose base_url the clone's copy points at the simulator: were the steps to
    # install another, the test key would go to the real API.
    assert CONFIG in script, f"the README's steps no longer install {CONFIG}"
    return script


def test_readme_systemd_steps_install_a_service_that_reloads_stops_and_keeps_its_state(
    steps: str, machine: Machine
) -> None:
    machine.run("mkdir", "-p", CLONE)
    machine.run("tar", "-x", "-C", CLONE, stdin=clone_archive())
    # As root would paste them in the clone, with the key in $KEY; -e: stop at the first
    # failure (no -x: it would echo the key).
    machine.run(
        "sh",
        "-eu",
        "-c",
        steps,
        options=("--workdir", CLONE, "--env", f"KEY={KEY}"),
        timeout=300,
    )
    assert machine.show("ActiveState", "UnitFileState") == {
        "ActiveState": "active",
        "UnitFileState": "enabled",
    }, machine.journal()
    simulator = "/opt/mailpartner-exporter/bin/mailpartner-simulator"
    machine.run(
        "systemd-run",
        "--unit=mailpartner-simulator",
        simulator,
        f"--listen={SIMULATOR}",
        f"--api-key={KEY}",
    )
    machine.fetch("/-/ready")
    first = machine.show("MainPID", "InvocationID")
    assert int(machine.run("stat", "-c", "%u", f"/proc/{first['MainPID']}")) != 0  # DynamicUser

    # A message added, then `systemctl reload`: the same process re-reads the config.
    machine.run(
        "sed",
        "-i",
        r's/^messages:$/messages:\n  - id: "302"/',
        "/etc/mailpartner-exporter/config.yaml",
    )
    machine.run("systemctl", "reload", SERVICE)
    deadline = time.monotonic() + 10
    while 'msg="configuration reloaded" messages=3' not in machine.journal(first["InvocationID"]):
        assert time.monotonic() < deadline, machine.journal()
        time.sleep(0.2)
    assert machine.show("MainPID", "ActiveState") == {
        "MainPID": first["MainPID"],
        "ActiveState": "active",
    }

    machine.run("systemctl", "stop", SERVICE)
    assert machine.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus") == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED: exited, not killed
        "ExecMainStatus": "0",
    }, machine.journal()
    assert "Traceback" not in machine.journal()

    # The state file, where the config puts it: in the unit's StateDirectory.
    state = yaml.safe_load((REPO / CONFIG).read_text(encoding="utf-8"))["state"]["path"]
    assert Path(state).parent == Path("/var/lib", unit_setting("StateDirectory"))
    machine.run("test", "-s", state)

    machine.run("systemctl", "start", SERVICE)
    second = machine.show("InvocationID")["InvocationID"]
    machine.fetch("/-/ready")
    assert f'msg="state restored" source=bulk_status path={state} messages=3' in machine.journal(
        second
    )
    # The key reached the simulator (its /v1/me answers no other): the credential was handed over.
    deadline = time.monotonic() + 30
    while "\nmailpartner_account_poll_success 1.0\n" not in machine.fetch("/metrics"):
        assert time.monotonic() < deadline, machine.journal(second)
        time.sleep(0.5)
