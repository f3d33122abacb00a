"""Whether the Hugging Face hub can be reached, asked once per process before a hub model is
loaded, so that an offline host or a mistyped name fails at once with what happened.

Left to itself, each ``from_pretrained`` of a hub name on a host that cannot reach the hub
retries its requests for tens of seconds to minutes before it fails or falls back to the
cache, on every run; a name that does not exist costs the same. Instead:

- ``HF_HUB_OFFLINE`` set: only the local cache is read;
- otherwise one request (``GET {HF_ENDPOINT}/api/models/NAME``, a few seconds at most, no
  retries) says which of three it is: the hub answers and has the model (a normal load), the
  hub answers that there is no such model (it fails now, nothing retried), or the hub cannot be
  reached: then this process reads only the cache, for every model, until it asks again
  (``RECHECK_SECONDS`` later).

A model in the local cache loads from it when the hub is away; one that is not fails at once
with the advice to pre-download it."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PROBE_SECONDS = 5.0  # how long the one request may take
RECHECK_SECONDS = 600.0  # an unreachable hub is asked again after this
# The files whose presence in the cache means a model was downloaded here: transformers
# models, diffusers pipelines.
MARKERS = ("config.json", "model_index.json")


class HubError(Exception):
    """The hub cannot give this model: offline (``offline`` true) or no such model."""

    def __init__(self, message: str, *, offline: bool) -> None:
        super().__init__(message)
        self.offline = offline


@dataclass(frozen=True)
class _Away:
    why: str
    since: float


_lock = threading.Lock()
_away: _Away | None = None


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def offline_reason() -> str | None:
    """Why this process reads only the local cache (``HF_HUB_OFFLINE``, or the hub did not
    answer when last asked), or None if it uses the hub."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    away = _away
    if away is not None and time.monotonic() - away.since < RECHECK_SECONDS:
        return f"{endpoint()} cannot be reached from this host ({away.why})"
    return None


def is_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for marker in MARKERS:
        try:
            found = try_to_load_from_cache(name, marker)
        except Exception:  # noqa: BLE001 - a name the hub would refuse: not cached
            return False
        if isinstance(found, str):
            return True
    return False


def hub_options(name: str) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments for hub model ``name`` (``local_files_only``
    when the hub is away, or does not know a model cached here); ``HubError`` when it cannot
    be had: the hub is away and the model is not in the cache, or the hub says there is no
    such model."""
    reason = offline_reason()
    missing = None
    if reason is None:
        reason, missing = _ask(name)
    if reason is None and missing is None:
        return {}
    if is_cached(name):
        return {"local_files_only": True}
    if missing is not None:
        raise HubError(
            f"{endpoint()} has no model {name!r} (HTTP {missing}): check the name; a private "
            "or gated model also needs HF_TOKEN",
            offline=False,
        )
    raise HubError(
        f"{reason}, and the model is not in this host's Hugging Face cache ({cache_dir()})",
        offline=True,
    )


def _ask(name: str) -> tuple[str | None, int | None]:
    """One request for ``name`` to the hub: (why it is away, None) if it could not be reached
    (remembered for the whole process); (None, status) if it has no such model; (None, None)
    if it answered otherwise (the load then goes as usual, the hub's errors its own)."""
    global _away
    from huggingface_hub import get_session, get_token

    url = f"{endpoint()}/api/models/{name}"
    # Only the token: the library's full headers may first fetch a registry of their own.
    token = get_token()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = get_session().get(url, headers=headers, timeout=PROBE_SECONDS)
    except Exception as exc:  # noqa: BLE001 - any transport failure: the hub is away
        why = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        with _lock:
            _away = _Away(why, time.monotonic())
        log.warning("the Hugging Face hub is not reachable (%s): models load from the cache", why)
        return f"{endpoint()} cannot be reached from this host ({why})", None
    with _lock:
        _away = None
    if response.status_code in (401, 404):
        return None, response.status_code
    return None, None


def forget() -> None:
    """Ask the hub again on the next load (tests)."""
    global _away
    with _lock:
        _away = None
