"""The image's pinned dependencies (deploy/docker/requirements.lock, build.lock) against
pyproject.toml: every dependency pinned, within its range, with hashes, and nothing pinned that
nothing needs. Refreshed by deploy/docker/lock.sh; the image build itself (smoke-test.sh, run
by .ci/run) fails on anything unpinned, as it installs with --require-hashes and --no-index.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy/docker"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
# name==version, then its --hash lines
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})+)", re.M)


def pins(lock: str) -> dict[str, Version]:
    text = (DOCKER / lock).read_text(encoding="utf-8")
    found = {canonicalize_name(m[1]): Version(m[2]) for m in PIN.finditer(text)}
    # Every requirement line is a pin with hashes: pip --require-hashes refuses anything else.
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert len(lines) == len(found), f"{lock}: a line that is not a pin with hashes"
    return found


def needed(requirements: list[str]) -> dict[str, list[Requirement]]:
    """Each package ``requirements`` need, transitively (read from the installed packages'
    metadata), with the requirements naming it."""
    wanted: dict[str, list[Requirement]] = {}
    queue = [Requirement(text) for text in requirements]
    while queue:
        requirement = queue.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        first = name not in wanted
        wanted.setdefault(name, []).append(requirement)
        if first:
            queue += [Requirement(text) for text in metadata.requires(name) or []]
    return wanted


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        ("requirements.lock", PROJECT["project"]["dependencies"]),
        ("build.lock", PROJECT["build-system"]["requires"]),
    ],
)
def test_lock_pins_exactly_what_pyproject_needs_within_its_ranges(
    lock: str, requirements: list[str]
) -> None:
    pinned = pins(lock)
    wanted = needed(requirements)
    missing = sorted(wanted.keys() - pinned.keys())
    assert not missing, f"{lock} misses {missing}: run deploy/docker/lock.sh"
    for name, asked in wanted.items():
        for requirement in asked:
            assert requirement.specifier.contains(pinned[name], prereleases=True), (
                f"{lock} pins {name}=={pinned[name]}, outside {requirement}: run lock.sh"
            )
    stale = sorted(pinned.keys() - wanted.keys())
    assert not stale, f"{lock} pins {stale}, which nothing needs: run deploy/docker/lock.sh"


def test_the_image_installs_only_the_locks() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    installs = re.findall(r"pip (?:install|wheel)[^&\n]*", dockerfile)
    assert installs, "no pip step in the Dockerfile"
    for step in installs:
        # Hash-checked locks, the project's own wheel without its dependencies, or the
        # wheels built from those, with no index.
        assert (
            "--require-hashes" in step
            or ("--no-deps" in step and step.rstrip().endswith(" ."))
            or "--no-index" in step
        ), step
