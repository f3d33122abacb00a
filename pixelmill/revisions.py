"""The revision a model name resolves to on this host, without loading the model (no torch):
what makes an earlier result current or stale. The worker records the revision it actually
loaded (``Runner.revision``); for a local folder it is this same content fingerprint, and for
a hub model the commit its cache resolves to, so both sides agree."""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

# A file larger than this is fingerprinted by its size and its first and last SAMPLE bytes
# (a safetensors file's header names every tensor, its shape and offset; any retraining
# changes the first and last tensors' bytes too), so a 5 GB model costs milliseconds.
WHOLE_FILE = 8 << 20
SAMPLE = 4 << 20
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def model_folder(name: str) -> Path | None:
    """The existing folder ``name`` names, or None (a hub id, a built-in name)."""
    try:
        path = Path(name).expanduser()
        return path.resolve() if path.is_dir() else None
    except (OSError, RuntimeError, ValueError):
        return None


def folder_revision(folder: Path) -> str:
    """``local-`` and 16 hex digits of a sha256 over every file under ``folder``: its relative
    path and its bytes (sampled past ``WHOLE_FILE``). The same folder copied to another host
    has the same revision; any change to a config or to the weights gives a new one."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            digest.update(f"{rel}\0".encode())
            _hash_file(path, digest)
    return f"local-{digest.hexdigest()[:16]}"


def _hash_file(path: Path, digest: hashlib._Hash) -> None:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest.update(f"{size}\0".encode())
        if size <= WHOLE_FILE:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
            return
        digest.update(fh.read(SAMPLE))
        fh.seek(size - SAMPLE)
        digest.update(fh.read(SAMPLE))


def hub_cache_revision(name: str) -> tuple[str, datetime] | None:
    """The commit this host's Hugging Face cache resolves hub id ``name`` to (its ``main``
    ref, as ``from_pretrained`` offline does), and when the ref was written; None if the
    model is not in the cache."""
    if not HUB_ID.match(name):
        return None
    try:
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "refs" / "main"
        commit = ref.read_text().strip()
        written = datetime.fromtimestamp(ref.stat().st_mtime, UTC)
    except (ImportError, OSError, UnicodeDecodeError):
        return None
    return (commit, written) if COMMIT.match(commit) else None


def local_revision(name: str) -> tuple[str, datetime | None] | None:
    """What ``name`` resolves to on this host without loading it: a local folder's content
    fingerprint (with no time: it is always current), or a hub id's cached commit and when it
    was cached. None when neither (a built-in name, a hub model not cached here)."""
    folder = model_folder(name)
    if folder is not None:
        try:
            return folder_revision(folder), None
        except OSError:
            return None
    return hub_cache_revision(name)


# Built-in model names (``pixelmill.models.registry``), and which are CLIP-style dual encoders:
# known here without importing torch.
BUILTIN_DUAL_ENCODERS = frozenset({"clip_vit_b32_random"})
BUILTIN_OTHERS = frozenset(
    {"efficientnet_lite0", "vit_b16_random", "blip_base_random", "sd_turbo_random"}
)


def model_config(name: str) -> dict[str, object] | None:
    """A folder's (or a hub id's cached snapshot's) ``config.json``, without loading the
    model; None when there is none here or it cannot be read."""
    folder = model_folder(name)
    if folder is None:
        cached = hub_cache_revision(name)
        if cached is None:
            return None
        from huggingface_hub import constants

        folder = (
            Path(constants.HF_HUB_CACHE)
            / f"models--{name.replace('/', '--')}"
            / "snapshots"
            / cached[0]
        )
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def dual_encoder(name: str) -> bool | None:
    """Whether ``name`` is a CLIP-style dual encoder (zero-shot labels, embed, search), when
    this host can tell without loading it: a built-in name, or a ``config.json`` in a folder or
    in the hub cache (its ``model_type``). None: unknown (the worker finds out)."""
    from pixelmill.catalog import DUAL_ENCODER_TYPES

    if name in BUILTIN_DUAL_ENCODERS:
        return True
    if name in BUILTIN_OTHERS:
        return False
    config = model_config(name)
    if config is None:
        return None
    return config.get("model_type") in DUAL_ENCODER_TYPES
