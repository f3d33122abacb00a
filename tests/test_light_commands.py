"""The light commands start without the heavy libraries: `pixelmill --version` and `--help`
load no command module, no SQL and no pydantic; `status`, `pause` and `cancel` load SQLAlchemy
and the settings, but never torch, the model libraries, Celery or Redis. Run as real
processes (the command line's own entry point), each reporting what it imported.

How long they take is a benchmark's business (docs/performance.md), not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from pixelmill.cli import COMMANDS, cli
from pixelmill.db.engine import open_database
from pixelmill.db.jobs import create_batch
from pixelmill.settings import load_settings
from tests.conftest import ROOT, pixelmill_env

MODELS = {"torch", "torchvision", "transformers", "diffusers", "timm", "PIL", "numpy"}
BROKER = {"celery", "kombu", "redis", "billiard"}
ELSE = {"alembic", "boto3", "botocore", "pyarrow", "tornado", "rich"}

# Runs the command line in a fresh interpreter, then writes which top-level packages it loaded.
PROBE = """
import json, sys
sys.argv = ["pixelmill", *json.loads(sys.argv[1])]
from pixelmill.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
with open(OUT, "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules)}, fh)
"""


def loaded(args: list[str], env: dict[str, str], out: Path) -> set[str]:
    code = PROBE.replace("OUT", repr(str(out)))
    result = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["code"] in (0, None), (args, report["code"], result.stderr)
    modules = set(report["modules"])  # the top-level packages, and pixelmill's own modules
    return {m.split(".")[0] for m in modules} | {m for m in modules if m.startswith("pixelmill.")}


def test_version_and_help_load_no_command_no_sql_and_no_pydantic(tmp_path: Path) -> None:
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    for args in (["--version"], ["--help"]):
        modules = loaded(args, env, tmp_path / "out.json")
        assert modules & (MODELS | BROKER | ELSE | {"sqlalchemy", "pydantic"}) == set(), args
    assert not (tmp_path / "data").exists()  # nothing made, either


def test_status_pause_and_cancel_load_the_database_only(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    with (
        open_database(settings.resolved_database_url(), parents=True) as database,
        database.sessions.begin() as session,
    ):
        batch = create_batch(session, task="classify", model="null", inputs=["a.jpg"])
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    for args in (["status"], ["status", batch.batch_id], ["status", "--json", batch.batch_id],
                 ["pause", batch.batch_id], ["cancel", batch.batch_id]):  # fmt: skip
        modules = loaded(args, env, tmp_path / "out.json")
        assert "sqlalchemy" in modules, args  # the probe really ran the command
        assert modules & (MODELS | BROKER | ELSE) == set(), args
        # nor the task types (a submit's), nor the dialects' INSERTs (a worker's)
        assert modules & {"pixelmill.tasks", "pixelmill.tasks.base"} == set(), args


def test_the_summaries_in_help_are_the_commands_own(tmp_path: Path) -> None:
    """`pixelmill --help` lists the commands from ``COMMANDS`` without importing them: each
    summary there is the first sentence of the command's docstring, and every command is
    there under its own name."""
    ctx = click.Context(cli)
    for name, (_, summary) in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
        assert command.get_short_help_str(10**6) == summary, name
    listed = subprocess.run([sys.executable, "-m", "pixelmill", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    for name in COMMANDS:
        assert f"\n  {name} " in listed.stdout


@pytest.mark.parametrize("name", ["no-such-command"])
def test_an_unknown_command_is_a_usage_error(tmp_path: Path, name: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pixelmill", name], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert f"No such command '{name}'" in result.stderr
