"""What every ``from_pretrained`` loader shares: the error a user sees when a model cannot be
loaded, and the revision recorded with each result."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pixelmill.errors import ModelUnavailable

SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


def load_failure(name: str, kind: str, exc: BaseException) -> ModelUnavailable:
    """A ModelUnavailable that names the model and says what to do about it."""
    text = str(exc).strip()
    reason = (text.splitlines()[0] if text else type(exc).__name__)[:300].rstrip(". ")
    if Path(name).exists():
        hint = (
            "Check that the folder holds a model of that kind "
            "(config and weights as saved by save_pretrained)."
        )
    else:
        hint = (
            "If this host is offline, pre-download the model where the hub is reachable "
            f"(`hf download {name}`) and copy the Hugging Face cache here, or pass a local "
            "folder with --model."
        )
    return ModelUnavailable(f"cannot load model {name!r} as {kind}: {reason}. {hint}")


def revision_of(config: Any, name: str) -> str | None:
    """The hub commit a model was loaded from, or "local" for a folder."""
    if isinstance(config, Mapping):  # diffusers' FrozenDict configs
        commit, path = None, str(config.get("_name_or_path") or "")
    else:
        commit = getattr(config, "_commit_hash", None)
        path = str(getattr(config, "_name_or_path", "") or "")
    if commit:
        return str(commit)
    if Path(name).exists():
        return "local"
    match = SNAPSHOT.search(path)
    return match.group(1) if match else None
