"""What every ``from_pretrained`` loader shares: the error a user sees when a model cannot be
loaded, and the revision recorded with each result."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pixelmill.errors import ModelUnavailable
from pixelmill.models.hub import HubError, hub_options, offline_reason
from pixelmill.revisions import folder_revision, hub_cache_revision, model_folder

SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


# A first line longer than this (a state dict's every mismatch on one line) is cut, at a word.
MAX_REASON = 10_000


def is_folder(name: str) -> bool:
    """Whether ``name`` is an existing path; False when the system refuses to look it up (a
    name too long, an unknown ``~user``, a folder it may not search)."""
    try:
        return Path(name).expanduser().exists()
    except (OSError, RuntimeError, ValueError):
        return False


def pretrained_options(name: str, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """``from_pretrained``'s keyword arguments for model ``name``: for a hub name, read only
    the local cache when the hub is away (``models.hub``: asked once, no minutes of retries);
    ``HubError`` if the model cannot be had at all (a load turns it into ``load_failure``)."""
    options: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if not is_folder(name):
        options.update(hub_options(name))
    return options


def reason_of(exc: BaseException) -> str:
    """An exception's whole first line (its type when it has no message), without a trailing
    period; cut at a word boundary only past ``MAX_REASON`` characters."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if len(line) > MAX_REASON:
        cut = line[:MAX_REASON]
        line = (cut.rsplit(None, 1)[0] if " " in cut else cut) + " …"
    return line.rstrip(". ") or type(exc).__name__


def load_failure(name: str, kind: str, exc: BaseException) -> ModelUnavailable:
    """A ModelUnavailable that names the model, says the real cause and what to do about it."""
    reason = reason_of(exc)
    away = offline_reason()
    if away is not None and not isinstance(exc, HubError) and not is_folder(name):
        reason += f" (only this host's Hugging Face cache was read: {away})"
    if isinstance(exc, HubError) and not exc.offline:
        hint = "Pass a model id as the hub spells it (org/name), or a local folder with --model."
    elif type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        hint = (
            "The device ran out of memory even with every other model dropped: use a smaller "
            "model or precision, or a device with more memory."
        )
    elif isinstance(exc, PermissionError):
        hint = "Check that the worker's user may read the model's folder and files."
    elif is_folder(name):
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
    """The revision a model was loaded as: a local folder's content fingerprint (the one a
    producer computes too, ``pixelmill.revisions``), else the hub commit it was loaded from
    (or, loaded from the cache alone, the commit the cache resolves it to)."""
    folder = model_folder(name)
    if folder is not None:
        return folder_revision(folder)
    if isinstance(config, Mapping):  # diffusers' FrozenDict configs
        commit, path = None, str(config.get("_name_or_path") or "")
    else:
        commit = getattr(config, "_commit_hash", None)
        path = str(getattr(config, "_name_or_path", "") or "")
    if commit:
        return str(commit)
    match = SNAPSHOT.search(path)
    if match:
        return match.group(1)
    cached = hub_cache_revision(name)  # read from the cache alone (offline): its main ref
    return cached[0] if cached else None
