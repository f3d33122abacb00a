"""A task type is one module and a runner: one added from outside pixelmill, through the
``pixelmill.tasks`` entry point group, runs end to end (`pixelmill run` with its own flag, its
results reused the second time, `results`, `export`) with nothing else of pixelmill touched."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pixelmill import tasks
from pixelmill.errors import InputError
from tests.conftest import PHOTOS, pixelmill, pixelmill_env

# The whole task type, as its author would write it in a package of their own.
TOY_TASK = '''
from typing import Any

import click
from PIL import Image, ImageStat
from pydantic import Field

from pixelmill.models.base import Runner
from pixelmill.tasks import Column, Task, TaskOptions


class BrightnessOptions(TaskOptions):
    scale: float = Field(default=1.0, gt=0, le=100)


class MeanBrightness(Runner[BrightnessOptions]):
    """The mean grey level of each image, 0..1, times the batch's scale."""

    task = "brightness"

    def _load(self, device: str) -> None:
        self.revision = "1"

    def preprocess(self, image: Image.Image) -> Any:
        return ImageStat.Stat(image.convert("L")).mean[0] / 255

    def forward(self, batch: Any, options: BrightnessOptions) -> list[dict[str, Any]]:
        return [{"brightness": round(value * options.scale, 4)} for value in batch]


class Brightness(Task):
    name = "brightness"
    options = BrightnessOptions
    default_model = "mean"
    default_batch_size = 4
    runners = {"brightness": "pixelmill_brightness:MeanBrightness"}
    builtin_models = {"brightness": {"mean": "pixelmill_brightness:MeanBrightness"}}
    model_kinds = {"brightness": "a brightness meter"}
    flags = (click.option("--scale", type=float, default=None, help="brightness: a factor."),)

    def summarize(self, result: dict[str, Any]) -> str | None:
        return f"brightness {result['brightness']:.3f}" if "brightness" in result else None

    def export_columns(self, labels: int) -> list[Column]:
        return [Column("brightness", "float")]

    def export_values(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"brightness": result.get("brightness")}
'''


def _install_toy_task(folder: Path) -> Path:
    """The package and its metadata (what `pip install` would leave): a module and an entry
    point naming its Task."""
    (folder / "pixelmill_brightness").mkdir(parents=True)
    (folder / "pixelmill_brightness" / "__init__.py").write_text(TOY_TASK)
    meta = folder / "pixelmill_brightness-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pixelmill-brightness\nVersion: 0.1\n"
    )
    (meta / "entry_points.txt").write_text(
        "[pixelmill.tasks]\nbrightness = pixelmill_brightness:Brightness\n"
    )
    return folder


@pytest.mark.slow
def test_a_task_type_from_another_package_runs_end_to_end(tmp_path, photos):
    plugin = _install_toy_task(tmp_path / "site")
    env = {**pixelmill_env(data_dir=str(tmp_path / "data")), "PYTHONPATH": str(plugin)}

    run = pixelmill("run", "brightness", str(photos), "--scale", "2", "--json", env=env)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert {Path(x["input"]).name for x in lines} == set(PHOTOS)
    for line in lines:
        assert (line["task"], line["model"], line["status"]) == ("brightness", "mean", "done")
        assert 0 < line["result"]["brightness"] <= 2, line
    batch = run.stderr.split("batch ", 1)[1].split(":", 1)[0]

    # Its results are reused by content, as any reusable task's: the same images again cost
    # nothing; another option (the recipe) does.
    again = pixelmill("run", "brightness", str(photos), "--scale", "2", "--again", env=env)
    assert again.returncode == 0 and f"({len(PHOTOS)} reused)" in again.stderr, again.stderr
    plan = pixelmill("run", "brightness", str(photos), "--scale", "3", "--plan", env=env)
    assert f"0 new, 0 changed, {len(PHOTOS)} stale, 0 reused" in plan.stdout, plan.stdout

    shown = pixelmill("results", batch, env=env)
    assert shown.returncode == 0 and shown.stdout.count("brightness ") == len(PHOTOS)
    out = tmp_path / "out.csv"
    export = pixelmill("export", batch, "-o", str(out), env=env)
    assert export.returncode == 0, export.stderr
    rows = list(csv.DictReader(out.open()))
    assert {float(r["brightness"]) for r in rows} == {x["result"]["brightness"] for x in lines}

    helped = pixelmill("run", "--help", env=env)
    assert "--scale" in helped.stdout and "brightness" in helped.stdout
    # Its flag is its own: on another task it is refused as an option that task does not have.
    misuse = pixelmill("run", "caption", str(photos), "--scale", "2", env=env)
    assert misuse.returncode == 2 and "--scale" in misuse.stderr, misuse.stderr

    # Without the package, the task type does not exist.
    gone = pixelmill("run", "brightness", str(photos), env=pixelmill_env(data_dir=str(tmp_path)))
    assert gone.returncode == 2 and "brightness" in gone.stderr, gone.stderr


def test_the_registry_names_the_built_in_task_types_and_refuses_an_unknown_one():
    assert tasks.names()[:4] == ("classify", "caption", "generate", "embed")
    assert tasks.get("caption").default_batch_size == 16
    assert tasks.get("generate").recipe("m", {}) is None  # never reused
    assert tasks.get("caption").recipe("m", {}) != tasks.get("caption").recipe(
        "m", {"num_beams": 2}
    )
    with pytest.raises(InputError, match="unknown task 'nope'; available: classify, caption"):
        tasks.get("nope")


def test_flags_of_another_task_type_are_refused_naming_the_one_they_belong_to():
    from pixelmill.cli.submit import submission

    def given(**set_: object) -> dict[str, object]:
        flags = {
            "labels_text": None,
            "labels_file": None,
            "templates": (),
            "prompts": (),
            "prompts_file": None,
            "init": (),
            "count": 1,
            "seed": None,
            "size": None,
        }
        return {**flags, **set_}  # fmt: skip

    with pytest.raises(InputError, match="--init is for generate, not caption"):
        submission("caption", ("a.jpg",), given(init=("b.jpg",)))
    with pytest.raises(InputError, match="--labels and --labels-file are for classify, not embed"):
        submission("embed", ("a.jpg",), given(labels_text="a,b"))
    args = submission("generate", (), given(prompts=("a lighthouse",), size="64x32", count=2))
    assert args["options"] == {"width": 64, "height": 32} and args["count"] == 2


def test_a_task_type_that_cannot_be_loaded_is_one_line_naming_it_not_a_traceback(tmp_path):
    site = tmp_path / "site"
    meta = site / "broken-0.1.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text("[pixelmill.tasks]\nbroken = no_such_module:Broken\n")
    env = {**pixelmill_env(data_dir=str(tmp_path / "data")), "PYTHONPATH": str(site)}
    # Every command whose flags come from the task types; `pixelmill --help` and --version
    # list and print without loading them (tests/test_light_commands.py), so they still work.
    for args in (("submit", "--help"), ("run", "classify", str(tmp_path))):
        result = pixelmill(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("pixelmill: task type 'broken' (no_such_module:Broken")
        assert "No module named 'no_such_module'" in result.stderr
        assert "Traceback" not in result.stderr
