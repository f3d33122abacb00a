"""The arrows of the design point one way (docs/layout.md), checked by import-linter with the
contracts in pyproject.toml; and every module of the package is in a layer."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=cwd, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pythonpath)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_no_import_points_up_a_layer_or_at_a_forbidden_library(tmp_path: Path) -> None:
    result = _lint_imports(tmp_path, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


def test_the_check_fails_on_an_arrow_that_points_up(tmp_path: Path) -> None:
    # A copy of the package (its links followed) with one import up a layer: db -> worker.
    shutil.copytree(ROOT / "pixelmill", tmp_path / "pixelmill", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (tmp_path / "pixelmill" / "db" / "upwards.py").write_text("import pixelmill.worker.local\n")
    result = _lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "pixelmill.db.upwards -> pixelmill.worker.local" in result.stdout


def _loaded_after(statement: str) -> set[str]:
    heavy = ("torch", "transformers", "diffusers", "sqlalchemy", "celery")
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)  # fmt: skip
    return set(result.stdout.split())


def test_the_core_stays_light_and_the_python_api_never_loads_torch() -> None:
    assert _loaded_after("import pixelmill, pixelmill.settings, pixelmill.catalog") == set()
    # Celery loads when a Client first talks to the broker (a submit), not before.
    assert _loaded_after("from pixelmill import Client, load_settings") == {"sqlalchemy"}


def test_every_module_of_the_package_is_in_a_layer() -> None:
    """A new module or folder directly under pixelmill/ must be given a layer, or the layer
    contract would say nothing about its arrows."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = (c for c in config["contracts"] if c["type"] == "layers")
    named = {name.strip() for layer in layers["layers"] for name in layer.replace("|", ":")
             .split(":")}  # fmt: skip
    package = ROOT / "pixelmill"
    present = {p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
    present |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert present, package
    assert present - named == set(), "modules in no layer of pyproject.toml's contract"
    assert named - present == set(), "layers naming no module"
