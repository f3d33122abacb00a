"""Which inputs are new, changed, stale or already done: content identity (sha256 of the bytes,
with git's stat fast path) and the reuse plan of a submission.

- A file whose path, size and modification time are what the index recorded is not read
  again: its recorded sha256 stands. Any other file is read and hashed (a thread pool; each
  read has ``PIXELMILL_READ_TIMEOUT``, so a hung mount fails that input, not the run).
- A file modified in the last ``RACY_SECONDS`` is hashed but not remembered: a change within
  the same clock tick would keep its size and mtime (git's "racy clean" entries).
- An input whose bytes were processed before with the same recipe (task, model, options,
  preprocessing version) and the model's current revision takes that result: its job is done
  at submit, pointing at the job that computed it. Same bytes under another recipe or an older
  revision: stale, processed again. A path whose bytes changed: changed. Else: new.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import stat
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from pixelmill.catalog import STORED_INPUT, job_path
from pixelmill.db.content_index import (
    FileStamp,
    earlier_results,
    known_files,
    known_objects,
    recorded_revision,
    remember_files,
)
from pixelmill.db.sources import RemoteObject, is_remote
from pixelmill.db.store import ObjectStore
from pixelmill.deadlines import DeadlineExceeded, DecodePool
from pixelmill.revisions import local_revision

RACY_SECONDS = 2.0
HASH_CHUNK = 1 << 20
HASH_THREADS = 8
HASH_WINDOW = 1024  # files being hashed (queued or in flight) at a time

NEW, CHANGED, STALE, REUSED, FORCED = "new", "changed", "stale", "reused", "forced"
ACTIONS = (NEW, CHANGED, STALE, REUSED)  # FORCED only with --force: what would be reused


@dataclass
class Contents:
    """Each input's sha256 (None: not a readable regular file; its job fails naming why), and
    for the paths whose bytes changed since last seen, the sha256 they had."""

    sha256: list[str | None]
    previous: dict[int, str] = field(default_factory=dict)
    hashed: int = 0  # files read and hashed (the rest took the stat fast path)
    stamps: dict[str, FileStamp] = field(default_factory=dict)  # to remember


def identify(
    sessions: sessionmaker[Session],
    inputs: Sequence[str],
    params: Sequence[dict[str, Any]] | None = None,
    *,
    listed: Mapping[str, RemoteObject] | None = None,
    read_timeout: float = 60,
    threads: int = HASH_THREADS,
    trust_stat: bool = True,
) -> Contents:
    """The sha256 of every input's bytes, from the index where the stat matches.

    An s3:// input is never fetched here: its (size, ETag) as ``listed`` finds its sha256 in
    the index, under its own URI or another (a copy, a rename); an object never seen has
    none yet (it is new: the worker that fetches it records its sha256). ``trust_stat=False``
    (``--force``) reads every file again."""
    paths = [job_path(name, params[i] if params else {}) for i, name in enumerate(inputs)]
    listed = listed or {}
    stats: list[tuple[int, int, int] | None] = []  # (size, mtime_ns, inode) of regular files
    for path in paths:
        stats.append(None if is_remote(path) else _stamp(path))
    keys = list(inputs)  # what the index is keyed by: the input as stored with the job
    objects = {i: listed[k] for i, k in enumerate(keys) if k in listed}
    with sessions() as session:
        looked_up = [k for i, (k, st) in enumerate(zip(keys, stats, strict=True))
                     if st is not None or i in objects]  # fmt: skip
        known = known_files(session, looked_up)
        elsewhere = known_objects(session, [(o.etag, o.size) for o in objects.values()])
    out = Contents(sha256=[None] * len(keys))
    todo: list[int] = []
    for i, (key, stamp) in enumerate(zip(keys, stats, strict=True)):
        was = known.get(key)
        obj = objects.get(i)
        if obj is not None:
            if was is not None and (was.size, was.etag) == (obj.size, obj.etag):
                out.sha256[i] = was.sha256
                continue
            if was is not None:
                out.previous[i] = was.sha256
            sha = elsewhere.get((obj.etag, obj.size))
            if sha is not None:
                out.sha256[i] = sha
                out.stamps[key] = FileStamp(obj.size, obj.modified_ns, sha, obj.etag)
            continue
        if stamp is None:
            continue
        if trust_stat and was is not None and (was.size, was.mtime_ns, was.inode) == stamp:
            out.sha256[i] = was.sha256
            continue
        todo.append(i)
    if todo:
        _hash_all(out, todo, paths, keys, known, read_timeout, threads)
    return out


def _stamp(path: str) -> tuple[int, int, int] | None:
    """A regular file's (size, mtime_ns, inode); None for anything else or nothing."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _hash_all(
    out: Contents,
    todo: list[int],
    paths: list[str],
    keys: list[str],
    known: dict[str, FileStamp],
    read_timeout: float,
    threads: int,
) -> None:
    """Hash the files at ``todo`` on ``threads`` threads, a window at a time (a first run over a
    million files holds one window's tasks, not a million)."""
    pool = DecodePool(min(threads, len(todo)), name="hash")
    racy = time.time() - RACY_SECONDS
    try:
        for start in range(0, len(todo), HASH_WINDOW):
            window = todo[start : start + HASH_WINDOW]
            futures = [
                (i, pool.submit(_hash_file, paths[i], deadline=read_timeout)) for i in window
            ]
            for i, future in futures:
                try:
                    sha, (size, mtime_ns, inode), stable = future.result()
                except (OSError, DeadlineExceeded):
                    continue  # unreadable or hung: its job fails at the worker, naming why
                out.sha256[i] = sha
                out.hashed += 1
                was = known.get(keys[i])
                if was is not None and was.sha256 != sha:
                    out.previous[i] = was.sha256
                if stable and mtime_ns / 1e9 < racy:
                    out.stamps[keys[i]] = FileStamp(size, mtime_ns, sha, inode=inode)
    finally:
        pool.shutdown(wait=False)


def _hash_file(path: str) -> tuple[str, tuple[int, int, int], bool]:
    """The sha256 of a regular file's bytes, its stat (from the open file, so that the two
    belong together; a file swapped for a FIFO is refused, never blocked on), and whether it
    stayed the same while it was read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
        digest = hashlib.sha256()
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
        after = os.fstat(fh.fileno())
    stable = (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    return digest.hexdigest(), (st.st_size, st.st_mtime_ns, st.st_ino), stable


def remember(sessions: sessionmaker[Session], contents: Contents) -> None:
    """Record what was hashed, for the next run's stat fast path."""
    if contents.stamps:
        with sessions.begin() as session:
            remember_files(session, contents.stamps)


def current_revision(session: Session, task: str, model: str) -> str | None:
    """The revision ``model`` runs as now, as far as this host can tell: a local folder's
    content fingerprint; for a hub id, the newer of this host's cached commit and the one the
    workers last ran; else (a built-in, a hub model not cached here) the one the workers last
    ran. None if nothing is known: then nothing is reused."""
    local = local_revision(model)
    if local is not None and local[1] is None:
        return local[0]
    recorded = recorded_revision(session, task, model)
    if local is None:
        return recorded[0] if recorded else None
    if recorded is None:
        return local[0]
    cached_at, ran_at = local[1], _aware(recorded[1])
    assert cached_at is not None
    return local[0] if cached_at > ran_at else recorded[0]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass
class ReusePlan:
    """What a submission would do with each input: one of ACTIONS, and for the reused ones the
    job whose result they take."""

    actions: list[str]
    reused: dict[int, str]

    @property
    def counts(self) -> dict[str, int]:
        return count_actions(self.actions)


def count_actions(actions: Sequence[str]) -> dict[str, int]:
    """How many inputs of each action: every one of ACTIONS, and FORCED when there are any."""
    counts = dict.fromkeys(ACTIONS, 0)
    for action in actions:
        counts[action] = counts.get(action, 0) + 1
    return counts


def plan_reuse(
    session: Session,
    *,
    task: str,
    model: str,
    recipe: str,
    revision: str | None,
    contents: Contents,
    force: bool = False,
) -> ReusePlan:
    """Sort the inputs into new, changed, stale and reused (``force``: nothing reused)."""
    shas = contents.sha256
    earlier = earlier_results(session, task, model, (s for s in shas if s))
    actions: list[str] = []
    reused: dict[int, str] = {}
    for i, sha in enumerate(shas):
        found = earlier.get(sha, []) if sha else []
        current = next((e for e in found if e.recipe == recipe and e.revision == revision), None)
        if current is not None and revision is not None:
            if force:
                actions.append(FORCED)
            else:
                actions.append(REUSED)
                reused[i] = current.job_id
        elif found:
            actions.append(STALE)
        elif i in contents.previous:
            actions.append(CHANGED)
        else:
            actions.append(NEW)
    return ReusePlan(actions=actions, reused=reused)


# ---- --upload -------------------------------------------------------------------------------

UPLOAD_THREADS = 8


def input_key(sha256: str, name: str) -> str:
    """The object store key of an uploaded input: by content (so the same bytes are stored
    once), keeping a plain extension for whoever browses the bucket."""
    ext = PurePosixPath(name).suffix.lower()
    if not ext or not all(c.isalnum() or c in "._-" for c in ext[1:]) or not ext.isascii():
        ext = ""
    return f"inputs/{sha256[:2]}/{sha256}{ext}"


def upload_inputs(
    store: ObjectStore,
    inputs: Sequence[str],
    params: Sequence[dict[str, Any]] | None,
    sha256: Sequence[str | None],
    *,
    skip: Mapping[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Copy each local input to process (not those in ``skip``: reused) into ``store`` under
    its content key, unless an object is there already; return the jobs' params with the key
    (``STORED_INPUT``) added. A store that fails raises StoreError before anything is
    registered; a file that cannot be read is left to fail its own job."""
    out = [dict(params[i]) if params else {} for i in range(len(inputs))]
    todo = [i for i, sha in enumerate(sha256)
            if sha and i not in (skip or {}) and not is_remote(inputs[i])]  # fmt: skip
    keys = {i: input_key(sha256[i] or "", inputs[i]) for i in todo}

    def copy(i: int) -> None:
        key = keys[i]
        if store.exists(key):
            return
        path = job_path(inputs[i], out[i])
        try:
            data = Path(path).read_bytes()
        except OSError:
            keys.pop(i, None)  # unreadable now: the job fails at the worker, naming the path
            return
        if hashlib.sha256(data).hexdigest() != sha256[i]:
            keys.pop(i, None)  # changed since it was hashed: the worker reads the path
            return
        kind = mimetypes.guess_type(inputs[i])[0] or "application/octet-stream"
        store.put(key, data, content_type=kind)

    with ThreadPoolExecutor(min(UPLOAD_THREADS, max(1, len(todo)))) as pool:
        list(pool.map(copy, todo))  # the first StoreError propagates
    for i, key in keys.items():
        out[i][STORED_INPUT] = key
    return out
