"""The installed distribution as a user meets it: one import name, and the README's Python API
example running from a folder that holds its own db.py, models.py, worker.py and producer.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import PHOTOS, ROOT, skimage_data

pytestmark = pytest.mark.slow

# The user's own modules, named like pixelmill's components. Each records that it was the one
# imported; pixelmill must never import them (and they must stay importable beside it).
USER_MODULES = ("db", "models", "worker", "producer")


def _readme_api_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## From a script", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no Python example under 'From a script'"
    return match.group(1)


def _build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(source)],
        check=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("pixelmill-*.whl")
    return built


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel built from the checkout, and the one built from the sdist (what `python -m
    build`, `uv build` and `pip install pixelmill-*.tar.gz` do): the sdist holds the component
    folders themselves, not the links."""
    out = tmp_path_factory.mktemp("dist")
    from_checkout = _build_wheel(ROOT, out / "checkout")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "--target", "sdist", "--directory",
         str(out / "sdist")],
        cwd=ROOT, check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    (sdist,) = (out / "sdist").glob("pixelmill-*.tar.gz")
    return from_checkout, _build_wheel(sdist, out / "from-sdist")


@pytest.fixture(scope="module")
def wheel(wheels: tuple[Path, Path]) -> Path:
    return wheels[1]


def test_the_wheel_holds_one_import_name_and_every_component(wheels: tuple[Path, Path]) -> None:
    from_checkout, from_sdist = (sorted(zipfile.ZipFile(w).namelist()) for w in wheels)
    assert from_sdist == from_checkout
    names = from_sdist
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"pixelmill", "pixelmill-0.1.0.dist-info"}, sorted(tops)
    for needed in (
        "pixelmill/db/migrations/env.py",
        "pixelmill/db/migrations/script.py.mako",
        "pixelmill/models/classify.py",
        "pixelmill/producer/client.py",
        "pixelmill/worker/device_main.py",
        "pixelmill/cli/run.py",
        "pixelmill/wire.py",
        "pixelmill/py.typed",
    ):
        assert needed in names, needed


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; its dependencies (torch and the rest) come from
    the test venv's site-packages through a .pth line, so nothing is downloaded."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-index", str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    return venv


def _user_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXELMILL_", "PYTHON"))}
    env.update(PIXELMILL_DATA_DIR=str(tmp_path / "data"))
    return env


def _photos(folder: Path) -> None:
    (folder / "photos").mkdir(parents=True)
    for name in PHOTOS:
        shutil.copy(skimage_data() / name, folder / "photos" / name)


def test_the_readme_example_runs_from_a_folder_with_its_own_db_models_worker_producer(
    venv: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    _photos(project)
    for module in USER_MODULES:
        (project / f"{module}.py").write_text(f"OWNER = 'the user'\nNAME = {module!r}\n")
    own = "".join(f"import {m}\n" for m in USER_MODULES)
    check = "".join(f"assert {m}.OWNER == 'the user', {m}.__file__\n" for m in USER_MODULES)
    leak = (
        "import pixelmill, sys\n"
        "assert pixelmill.__file__.startswith(sys.prefix), pixelmill.__file__\n"
        "import pixelmill.db, pixelmill.models, pixelmill.producer, pixelmill.worker\n"
    )
    (project / "label.py").write_text(own + leak + _readme_api_example() + check)

    env = _user_env(tmp_path)
    result = subprocess.run(
        [str(venv / "bin" / "python"), "label.py"], cwd=project, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if " done " in line]
    assert len(lines) == len(PHOTOS), result.stdout
    assert all("label" in line for line in lines), result.stdout

    # The command the wheel installs works the same way from there.
    help_ = subprocess.run(
        [str(venv / "bin" / "pixelmill"), "--help"], cwd=project, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert help_.returncode == 0 and "run" in help_.stdout, help_.stderr


def test_no_process_pixelmill_starts_imports_from_the_folder_it_runs_in(
    venv: Path, tmp_path: Path
) -> None:
    """A folder with its own pixelmill.py, celery.py, redis.py, kombu.py and torch.py: the
    broker keeper and the device workers (started with ``python -m``) must not import them."""
    project = tmp_path / "project"
    _photos(project)
    for module in ("pixelmill", "celery", "redis", "kombu", "torch"):
        (project / f"{module}.py").write_text(f"raise SystemExit('the user\\'s {module}.py')\n")
    result = subprocess.run(
        [str(venv / "bin" / "pixelmill"), "run", "classify", "photos/", "--model", "null"],
        cwd=project, env=_user_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{len(PHOTOS)} done, 0 failed" in result.stderr
