"""What a task type is: one class that holds everything pixelmill knows of it.

A task type (``Task``) names its options (a ``TaskOptions`` model: validated at submit, stored
with the batch, handed typed to the runner), its default model and batch size, the runners a
model name loads as (by dotted path: this layer imports no torch), its command-line flags and
how they become options and jobs, whether and how its results are reused (the recipe), how a
result reads on one line, and the columns it adds to an export. The rest of pixelmill asks the
registry (``pixelmill.tasks``) instead of naming tasks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pixelmill.errors import BadInput, InputError

#: pixelmill's own preprocessing version: bump it when decoding or preprocessing changes what a
#: model sees (orientation, colour conversion, resizing), so every earlier result goes stale.
PREPROCESS_VERSION = 1


class TaskOptions(BaseModel):
    """A batch's options: validated at submit, stored with the batch, read by the worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Column:
    """One column of a CSV or Parquet export: its name and type (string, float, int, bool,
    timestamp (UTC, microseconds) or vector (float32s; Parquet only))."""

    name: str
    kind: str = "string"


Flag = Callable[[Callable[..., Any]], Callable[..., Any]]  # a click.option(...) decorator


class Task:
    """A task type. Subclass it, set the class attributes, override what differs."""

    name: ClassVar[str]
    options: ClassVar[type[TaskOptions]] = TaskOptions
    default_model: ClassVar[str]
    default_batch_size: ClassVar[int] = 32  # images per model batch (PIXELMILL_BATCH_SIZE wins)
    # What a hub id or a local folder loads as, per runner kind ("module:Class"); most tasks
    # have one kind, their own name (``runner_kind``).
    runners: ClassVar[Mapping[str, str]] = {}
    # Built-in model names, per runner kind: name -> "module:Class".
    builtin_models: ClassVar[Mapping[str, Mapping[str, str]]] = {}
    # What a model is loaded as, per runner kind, in the reason a load failure gives.
    model_kinds: ClassVar[Mapping[str, str]] = {}
    # False for a task whose results depend on more than the input's bytes, the model and the
    # options (generate draws from seeds and prompts): never reused.
    reusable: ClassVar[bool] = True
    # True for a task whose jobs are made from prompts (and optional init images).
    takes_prompts: ClassVar[bool] = False
    # True for a task that stores an embedding per job (search, relabel, export's vectors).
    embeds: ClassVar[bool] = False
    # Its flags on `pixelmill submit` and `run` (click.option decorators).
    flags: ClassVar[Sequence[Flag]] = ()

    # ---- options and models -----------------------------------------------------------------

    def runner_kind(self, options: TaskOptions) -> str:
        """What a batch's jobs are run by (a model cache key): by default the task itself."""
        return self.name

    def model_for(self, options: Mapping[str, Any]) -> str:
        """The model a batch runs when none is named."""
        return self.default_model

    def check_model(self, model: str, options: Mapping[str, Any]) -> None:
        """Refuse at submit a model the workers would refuse (InputError), when this host can
        tell without loading it."""

    def validate(
        self, options: Mapping[str, Any] | None, model: str, *, has_inputs: bool | None = None
    ) -> TaskOptions:
        """A batch's options, validated (BadInput naming the bad option) and completed for
        ``model``; ``has_inputs`` (at submit): whether the batch has input images."""
        try:
            return self.options.model_validate(dict(options or {}))
        except ValidationError as exc:
            problems = "; ".join(
                (f"{_flag(e['loc'])}: " if e["loc"] else "")
                + e["msg"].removeprefix("Value error, ")
                for e in exc.errors()
            )
            raise BadInput(f"invalid {self.name} options: {problems}") from None

    # ---- reuse --------------------------------------------------------------------------------

    def recipe(self, model: str, options: Mapping[str, Any]) -> str | None:
        """What a result depends on besides its input's bytes and the model's revision: the
        task, the model's name, the options as stored with the batch and
        ``PREPROCESS_VERSION``, as a sha256. None for a task whose results are not reused."""
        if not self.reusable:
            return None
        body = {
            "task": self.name,
            "model": model,
            "options": dict(options),
            "preprocess": PREPROCESS_VERSION,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    # ---- the command line ---------------------------------------------------------------------

    def take_flags(self, given: dict[str, Any]) -> dict[str, Any]:
        """Remove from ``given`` (every flag's value, by its parameter name) this task's flags
        that are not options as they are, and return those of them that were set. What is left
        in ``given`` goes into the options as it is."""
        return {}

    def refuse_flags(self, taken: Mapping[str, Any], task: str) -> None:
        """``taken`` (from ``take_flags``) on a batch of another ``task``: InputError."""
        for flag in taken:
            raise InputError(f"--{flag.replace('_', '-')} is for {self.name}, not {task}")

    def submission(
        self, inputs: Sequence[str], options: dict[str, Any], taken: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The keyword arguments of ``Client.submit`` (less the task and the flags every task
        shares) for what was typed; InputError on misuse."""
        if not inputs:
            raise InputError(f"{self.name} needs at least one INPUT (a file, a folder or -)")
        return {"inputs": list(inputs), "options": options}

    # ---- results ------------------------------------------------------------------------------

    def summarize(self, result: Mapping[str, Any]) -> str | None:
        """A done job's result on one line, if it is one of this task's (else None)."""
        return None

    def export_columns(self, labels: int) -> list[Column]:
        """The columns this task's results add to a CSV or Parquet export (``labels``: how many
        label/score pairs a classifier's take)."""
        return []

    def export_values(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """A done job's result as the values of ``export_columns`` (by name)."""
        return {}


def _flag(loc: tuple[Any, ...]) -> str:
    """An option's name as the CLI spells it: max_new_tokens -> --max-new-tokens."""
    return "--" + str(loc[0]).replace("_", "-") if loc else "options"


def set_values(
    given: dict[str, Any], names: Sequence[str], unset: Mapping[str, Any]
) -> dict[str, Any]:
    """Pop ``names`` from ``given``; return those whose value is not their ``unset`` one (None,
    or an empty tuple for a repeatable flag, unless ``unset`` says otherwise)."""
    out = {}
    for name in names:
        value = given.pop(name, None)
        if value not in (None, (), unset.get(name, None)):
            out[name] = value
    return out
