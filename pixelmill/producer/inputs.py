"""Turning what a user typed (files, folders, ``-`` for stdin, prompts) into jobs."""

from __future__ import annotations

import base64
import os
import secrets
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from pixelmill.catalog import IMAGE_EXTENSIONS, PATH_BYTES
from pixelmill.db.sources import ObjectUnavailable
from pixelmill.errors import InputError

S3 = "s3://"


class Lister(Protocol):
    def list(self, uri: str, extensions: Collection[str]) -> Iterable[Any]: ...


def expand_inputs(
    inputs: Iterable[str | os.PathLike[str]],
    stdin: TextIO | None = None,
    *,
    remote: Lister | None = None,
    listed: dict[str, Any] | None = None,
) -> list[str]:
    """Files as given (any extension: a non-image fails its own job with a clear reason),
    folders recursively (image extensions only, sorted), ``-`` reads one path per line.
    Returns absolute paths, without duplicates, in order.

    ``s3://bucket/prefix/`` is listed by ``remote`` (image extensions only, in key order;
    ``s3://bucket/key`` naming one object is that object), and each object as listed (its
    size and ETag) is kept in ``listed`` by URI, also for a URI read from stdin. A URI typed
    as an argument that names nothing is a usage error; one read from stdin is submitted and
    fails its own job.

    A path typed as an argument that does not exist is a usage error (a typo: InputError).
    One read from stdin is submitted anyway and fails its own job ("no such file or
    directory"): one stale line in a list of 100,000 must not refuse the other 99,999."""
    seen: set[str] = set()
    out: list[str] = []

    def add(path: Path | str) -> None:
        key = path if isinstance(path, str) else os.fsdecode(path.absolute())
        if key not in seen:
            seen.add(key)
            out.append(key)

    def add_remote(uri: str) -> None:
        if remote is None:
            raise InputError(f"{uri}: s3:// inputs need the S3 settings")
        for obj in remote.list(uri, IMAGE_EXTENSIONS):
            if obj.uri not in seen:
                seen.add(obj.uri)
                out.append(obj.uri)
                if listed is not None:
                    listed[obj.uri] = obj

    for item in inputs:
        if isinstance(item, str) and item.startswith(S3):
            add_remote(item)
            continue
        if os.fspath(item) == "-":
            stream = stdin if stdin is not None else sys.stdin
            for line in stream:
                line = line.rstrip("\n")
                if line.endswith("\r") and not os.path.lexists(line):
                    line = line[:-1]  # a list written on Windows (CRLF)
                if line.startswith(S3):
                    try:
                        add_remote(line)
                    except (InputError, ObjectUnavailable):  # its job fails naming why
                        if line not in seen:
                            seen.add(line)
                            out.append(line)
                    continue
                if line.strip():
                    path = Path(line)
                    if path.is_dir():
                        _expand_one(path, add)
                    else:
                        add(path)  # missing: its job fails naming it
            continue
        _expand_one(Path(item), add)
    return out


def _expand_one(path: Path, add: Callable[[Path | str], None]) -> None:
    if path.is_dir():
        # Strings, not Path objects: a folder of 200,000 files is listed in a fraction of a second.
        for root, dirs, files in os.walk(os.fsdecode(path.absolute())):
            dirs.sort()
            for name in sorted(files):
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and name[0] != ".":
                    add(os.path.join(root, name))
        return
    if path.exists() or path.is_symlink():
        add(path)
        return
    raise InputError(f"{path}: no such file or directory")


MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class JobPlan:
    """The jobs of one submission: an input per job and, for generate, its parameters."""

    inputs: list[str]
    params: list[dict[str, Any]] | None = None


def plan_jobs(
    task: str,
    paths: Sequence[str],
    *,
    prompts: Sequence[str] | None = None,
    count: int = 1,
    seed: int | None = None,
) -> JobPlan:
    """One job per input for classify and caption. For generate, one job per image to make:
    each prompt ``count`` times (text-to-image), or each init image x prompt x ``count``
    (image-to-image). Generated images get consecutive seeds from ``seed`` (random if unset),
    recorded per job, so any one image can be made again."""
    from pixelmill import tasks  # the task types: for a submit, not for `status`

    if not tasks.get(task).takes_prompts:
        if prompts or count != 1 or seed is not None:
            raise InputError(f"--prompt, --count and --seed are for generate, not {task}")
        if not paths:
            raise InputError(f"{task} needs input images")
        return JobPlan(inputs=list(paths))
    prompts = [p.strip() for p in prompts or [] if p.strip()]
    if not prompts:
        raise InputError("generate needs at least one --prompt (or --prompts-file)")
    if count < 1:
        raise InputError(f"--count must be at least 1, got {count}")
    base = seed if seed is not None else secrets.randbelow(2**31)
    if not 0 <= base <= MAX_SEED:
        raise InputError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    pairs = [(path, p) for path in paths for p in prompts] if paths else [(p, p) for p in prompts]
    inputs: list[str] = []
    params: list[dict[str, Any]] = []
    for source, prompt in pairs:
        for _ in range(count):
            params.append({"prompt": prompt, "seed": (base + len(inputs)) % (MAX_SEED + 1)})
            inputs.append(source)
    return JobPlan(inputs=inputs, params=params)


def storable(plan: JobPlan) -> JobPlan:
    """File names that are not valid UTF-8 (possible on Linux) cannot be stored as text: such a
    job's ``input`` shows the name with \\x escapes, and its params carry the exact bytes, which
    the worker opens. Other jobs are unchanged."""
    inputs: list[str] = []
    params: list[dict[str, Any]] = []
    changed = False
    for i, name in enumerate(plan.inputs):
        extra = dict(plan.params[i]) if plan.params is not None else {}
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raw = os.fsencode(name)
            extra[PATH_BYTES] = base64.b64encode(raw).decode("ascii")
            name = raw.decode("utf-8", "backslashreplace")
            changed = True
        inputs.append(name)
        params.append(extra)
    if not changed:
        return plan
    return JobPlan(inputs=inputs, params=params)
