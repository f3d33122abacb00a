"""Malformed messages go to the dead letters, never back onto the queue, and never stop a worker.

Before: a body that is not ``[args, kwargs, embed]`` raised inside Celery's strategy, in the
consumer's own loop: the worker stopped, the message was restored, and every worker after it
stopped on it too. A message of a million ids was retried with backoff while its claim failed.
"""

from __future__ import annotations

import json
import logging
import pickle
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kombu import Message
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from pixelmill.db.dead_letters import DeadLetterRecord, recent_dead_letters, record_dead_letter
from pixelmill.db.engine import make_engine, make_sessionmaker
from pixelmill.db.migrate import upgrade
from pixelmill.db.schema import DeadLetter
from pixelmill.producer import Client
from pixelmill.settings import load_settings
from pixelmill.wire import MAX_BATCH_IDS, MAX_MESSAGE_BYTES, NOOP, PROCESS_BATCH, create_app
from pixelmill.wire import queue_length as broker_queue_length
from pixelmill.worker.message_check import DeadLetters, Refusal, check_message
from tests.conftest import ROOT, pixelmill, settings_env


def _message(
    body: Any,
    *,
    task: str | None = PROCESS_BATCH,
    content_type: str = "application/json",
    raw: bool = False,
    headers: dict[str, Any] | None = None,
) -> Message:
    if headers is None:
        headers = {"task": task, "id": str(uuid.uuid4())} if task is not None else {}
    data = body if raw else json.dumps(body).encode()
    return Message(
        body=data,
        content_type=content_type,
        content_encoding="utf-8",
        headers=headers,
        delivery_info={"routing_key": "q"},
        accept={"application/json"},
    )


def _kind(message: Message) -> str | None:
    refusal = check_message(message)
    return refusal.kind if refusal else None


# ---- the check, without services -------------------------------------------------------------


def test_well_formed_messages_pass():
    assert _kind(_message([[[str(uuid.uuid4()) for _ in range(MAX_BATCH_IDS)]], {}, {}])) is None
    assert _kind(_message([[["a"]], {}, None])) is None
    assert _kind(_message([[], {}, {"callbacks": None}], task=NOOP)) is None


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (_message({"garbage": True}), "malformed"),
        (_message(None), "malformed"),
        (_message(5), "malformed"),
        (_message("abc"), "malformed"),
        (_message([[[1, 2, {"x": 1}]], {}, {}]), "malformed"),
        (_message([["abc"], {}, {}]), "malformed"),
        (_message([[["a", 3]], {}, {}]), "malformed"),
        (_message([[["a"]], {"evil": 1}, {}]), "malformed"),
        (_message([[["a"]], {}, "x"]), "malformed"),
        (_message([[["x" * 65]], {}, {}]), "malformed"),
        (_message([["a"], {}, {}], task=NOOP), "malformed"),
        (_message([[["a"] * (MAX_BATCH_IDS + 1)], {}, {}]), "oversized"),
        (_message(b"x" * (MAX_MESSAGE_BYTES + 1), raw=True), "oversized"),
        (_message(b"\x00not json{{", raw=True), "undecodable"),
        (
            _message(
                pickle.dumps(((["a"],), {}, {})),
                raw=True,
                content_type="application/x-python-serialize",
            ),
            "refused-content",
        ),
        (_message([[["a"]], {}, {}], task="pixelmill.nope"), "unknown-task"),
        (_message([[["a"]], {}, {}], task="celery.chord_unlock"), "unknown-task"),
        (_message({"task": PROCESS_BATCH, "args": [["a"]]}, task=None), "malformed"),
        (_message([[["a"]], {}, {}], headers={"task": PROCESS_BATCH}), "malformed"),
    ],
)
def test_bad_messages_are_refused_with_their_kind(message, kind):
    assert _kind(message) == kind


def test_a_dead_letter_is_logged_whole_when_the_database_is_away(tmp_path, caplog):
    away = sessionmaker(create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}"))
    letters = DeadLetters(away, queue="q", worker="w")
    with caplog.at_level(logging.WARNING, logger="pixelmill.deadletter"):
        record = letters.record(_message({"garbage": True}), Refusal("malformed", "no"))
    assert record.kind == "malformed" and record.body == '{"garbage": true}'
    [warning, error] = caplog.records
    assert warning.levelno == logging.WARNING and "dead letter (malformed)" in warning.getMessage()
    assert (
        error.levelno == logging.ERROR and '"body": "{\\"garbage\\": true}"' in error.getMessage()
    )


def test_dead_letters_are_stored_bounded_and_listed_newest_first(database_url):
    engine = make_engine(database_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    letters = DeadLetters(sessions, queue="q", worker="w")
    letters.record(_message(b"\xff" * 100_000, raw=True), Refusal("undecodable", "first"))
    letters.record(_message({"garbage": True}), Refusal("malformed", "second"))
    with sessions() as s:
        newest, oldest = recent_dead_letters(s, 10)
        assert s.scalar(select(DeadLetter.size).where(DeadLetter.reason == "first")) == 100_000
    assert (newest.reason, oldest.reason) == ("second", "first")
    assert oldest.body == "\\xff" * 2048  # the first 2 KB only, undecodable bytes escaped
    assert newest.task == PROCESS_BATCH and newest.queue == "q" and newest.worker == "w"
    with sessions.begin() as s:
        assert record_dead_letter(s, DeadLetterRecord(kind="malformed", reason="3")) > 0
    engine.dispose()


# ---- against a real Redis and a real worker ----------------------------------------------------


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        found.update(int(p) for p in path.read_text().split())
    return found


@pytest.mark.slow
def test_malformed_messages_are_dead_lettered_and_the_worker_goes_on(
    tmp_path, photos, redis_server
):
    marker = tmp_path / "pwned"
    queue = "dead-" + uuid.uuid4().hex[:8]
    settings = load_settings(
        data_dir=tmp_path / "data",
        broker_url=redis_server.url,
        database_url=f"sqlite:///{tmp_path / 'dl.db'}",
        queue=queue,
    )
    app = create_app(settings)
    expected: dict[str, str] = {}  # message id -> kind

    def publish(
        body: Any,
        kind: str,
        *,
        task: str = PROCESS_BATCH,
        raw: bool = False,
        content_type: str = "application/json",
    ) -> None:
        message_id = str(uuid.uuid4())
        expected[message_id] = kind
        with app.connection_for_write() as conn:
            conn.Producer().publish(
                body if raw else json.dumps(body),
                routing_key=queue,
                exchange="",
                serializer=None,
                content_type=content_type,
                content_encoding="binary" if raw else "utf-8",
                headers={"task": task, "id": message_id, "lang": "py"},
            )

    photo = [str(sorted(photos.iterdir())[0])]
    with Client(settings) as pm:
        before = pm.submit("classify", photo)
        publish({"garbage": True}, "malformed")
        publish([[[1, 2, {"x": 1}]], {}, {}], "malformed")  # ids that are not strings
        publish([["abc"], {}, {}], "malformed")  # not a list
        publish([[["a"]], {"evil": 1}, {}], "malformed")
        publish(None, "malformed")
        publish([[[str(uuid.uuid4()) for _ in range(1_000_000)]], {}, {}], "oversized")
        publish([[[f"j{i}" for i in range(MAX_BATCH_IDS + 1)]], {}, {}], "oversized")
        publish(b"\x00\x01 not json {{{", "undecodable", raw=True)
        publish(
            pickle.dumps(((os_mkdir_exploit(marker),), {}, {})),
            "refused-content",
            raw=True,
            content_type="application/x-python-serialize",
        )
        publish([[["a"]], {}, {}], "unknown-task", task="pixelmill.no_such_task")
        with app.connection_for_write() as conn:  # not a Celery task message at all
            conn.Producer().publish(
                b'{"hello": 1}',
                routing_key=queue,
                exchange="",
                serializer=None,
                content_type="application/json",
                content_encoding="utf-8",
            )
        after = pm.submit("classify", photo, again=True)

        log_path = tmp_path / "worker.log"
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pixelmill",
                    "worker",
                    "--devices",
                    "cpu",
                    "--cpu-workers",
                    "1",
                ],
                env=settings_env(settings),
                cwd=ROOT,
                stdout=log,
                stderr=log,
            )
        try:
            deadline = time.monotonic() + 60
            while not (children := _children(worker.pid)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(children) == 1, log_path.read_text()
            deadline = time.monotonic() + 240
            while {pm.status(b.batch_id).by_status.get("done") for b in (before, after)} != {1}:
                if _children(worker.pid) != children:  # it stopped, and was started again
                    pytest.fail("the device worker restarted:\n" + log_path.read_text()[-3000:])
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            with pm.sessions() as s:
                rows = s.scalars(select(DeadLetter).order_by(DeadLetter.id)).all()
            assert _children(worker.pid) == children  # the same device process throughout
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        text = log_path.read_text(errors="replace")
        assert "exited with" not in text and "Unrecoverable" not in text, text[-3000:]

    assert not marker.exists(), "the pickled payload was executed"
    assert len(rows) == len(expected) + 1, [(r.kind, r.reason) for r in rows]
    assert {r.message_id: r.kind for r in rows if r.message_id} == expected
    [plain] = [r for r in rows if r.message_id is None]
    assert plain.kind == "malformed" and plain.body == '{"hello": 1}'
    assert {int((r.worker or "/0").rsplit("/", 1)[1]) for r in rows} == children
    big = next(r for r in rows if r.size > MAX_MESSAGE_BYTES)
    assert big.kind == "oversized" and len(big.body) == 2048 and big.queue == queue
    assert all(r.task for r in rows if r.message_id)
    assert "dead letter (malformed)" in text
    # Nothing went back onto the queue, nothing is held unacknowledged.
    assert broker_queue_length(app, queue) == 0
    unacked = redis_server.client().hvals("unacked")
    assert not [u for u in unacked if json.loads(u)[2] == queue]

    env = settings_env(settings)
    out = pixelmill("dead-letters", "--json", "--limit", "3", env=env)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert listed["count"] == len(rows)
    assert [d["id"] for d in listed["dead_letters"]] == [r.id for r in rows[::-1][:3]]
    text_out = pixelmill("dead-letters", env=env)
    assert text_out.returncode == 0 and f"{len(rows)} dead letters" in text_out.stdout
    status = pixelmill("status", env=env)
    assert status.returncode == 0 and f"{len(rows)} dead letters (pixelmill dead-letters)" in (
        status.stderr
    )
    app.close()


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # runs on unpickling
        import os

        return (os.mkdir, (self.marker,))


def os_mkdir_exploit(marker: Path) -> _Exploit:
    return _Exploit(str(marker))
