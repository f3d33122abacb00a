"""Turning what a user typed (files, folders, ``-`` for stdin) into a list of input paths."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from pixelmill.catalog import IMAGE_EXTENSIONS
from pixelmill.errors import PixelmillError


class InputError(PixelmillError):
    """An input argument that names nothing usable (a usage error, not a failed job)."""


def expand_inputs(
    inputs: Iterable[str | os.PathLike[str]], stdin: TextIO | None = None
) -> list[str]:
    """Files as given (any extension: a non-image fails its own job with a clear reason),
    folders recursively (image extensions only, sorted), ``-`` reads one path per line.
    Returns absolute paths, without duplicates, in order."""
    seen: set[str] = set()
    out: list[str] = []

    def add(path: Path) -> None:
        key = os.fsdecode(path.absolute())
        if key not in seen:
            seen.add(key)
            out.append(key)

    for item in inputs:
        if os.fspath(item) == "-":
            stream = stdin if stdin is not None else sys.stdin
            for line in stream:
                line = line.rstrip("\n")
                if line.strip():
                    _expand_one(Path(line), add)
            continue
        _expand_one(Path(item), add)
    return out


def _expand_one(path: Path, add: Callable[[Path], None]) -> None:
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                candidate = Path(root) / name
                if candidate.suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                    add(candidate)
        return
    if path.exists() or path.is_symlink():
        add(path)
        return
    raise InputError(f"{path}: no such file or directory")
