"""The lock (docs/contributing.md, "The lock"): what a fresh machine installs is what the tests
passed with.

The lock files are made by `uv pip compile` (scripts/update-lock); these tests hold them to
pyproject.toml and to what scripts/setup and the Dockerfile install, so that a range widened or
a dependency added without moving the lock fails here, not on somebody's fresh machine."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

RUNTIME = ROOT / "requirements" / "runtime.txt"
TEST = ROOT / "requirements" / "test.txt"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(lock: Path) -> dict[str, set[str]]:
    """Name -> the versions the lock pins it to (a universal lock may pin one name twice, under
    markers that exclude each other: numpy for Python 3.11 and for 3.12+), with the check that
    each is pinned with == and carries hashes (pip's --require-hashes needs them all)."""
    text = lock.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2].strip())
    found: dict[str, set[str]] = {}
    for block in blocks:
        head = block.splitlines()[0]
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)", head)
        assert match, f"{lock.name}: not an exact pin: {head!r}"
        assert "--hash=sha256:" in block, f"{lock.name}: {head!r} has no hash"
        found.setdefault(canonicalize_name(match[1]), set()).add(match[2])
    return found


def requirements(*extras: str) -> list[Requirement]:
    listed = list(PROJECT["dependencies"])
    for extra in extras:
        listed += PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in listed]


@pytest.mark.parametrize(
    ("lock", "extras"), [(RUNTIME, ("nvml",)), (TEST, ("nvml", "test"))], ids=["runtime", "test"]
)
def test_the_lock_holds_every_dependency_inside_its_range(lock: Path, extras: tuple[str, ...]):
    locked = pins(lock)
    for requirement in requirements(*extras):
        name = canonicalize_name(requirement.name)
        assert name in locked, (
            f"{name} is in pyproject.toml but not in {lock.name}: scripts/update-lock"
        )
        for version in locked[name]:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{lock.name} pins {name}=={version}, outside pyproject.toml's "
                f"{requirement.specifier}: scripts/update-lock"
            )
    for tool in ("pip", "hatchling", "editables"):  # requirements/tools.in
        assert tool in locked, f"{tool} is not in {lock.name}"


def test_the_runtime_lock_is_the_test_lock_less_the_test_tools():
    runtime, test = pins(RUNTIME), pins(TEST)
    differ = {name: (v, test.get(name)) for name, v in runtime.items() if test.get(name) != v}
    assert not differ, f"runtime.txt pins versions the tests did not run with: {differ}"
    only_tests = set(test) - set(runtime)
    assert {"pytest", "mypy", "ruff", "uv"} <= only_tests


def test_this_venv_holds_exactly_the_test_lock():
    """What the tests run in is the lock: scripts/setup installed it, and nothing else."""
    locked = pins(TEST)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("pixelmill", None)
    wrong = {n: (v, locked.get(n)) for n, v in installed.items() if v not in locked.get(n, ())}
    if wrong and not (ROOT / ".venv" / "pixelmill-setup").exists():
        pytest.skip("not running in scripts/setup's .venv")
    assert not wrong, f"installed (version, locked version) that differ: {wrong}"


def test_setup_and_the_image_install_the_lock_by_hash_and_nothing_beside_it():
    setup = (ROOT / "scripts" / "setup").read_text()
    assert '--require-hashes --no-deps -r "$lock"' in setup
    assert "--no-build-isolation" in setup
    docker = (ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements/runtime.txt" in docker
    assert re.search(r"pip install --no-deps --no-build-isolation \.\n", docker)
