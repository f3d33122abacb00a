"""The wire is JSON only: a pickled message is refused by a real worker, never executed."""

from __future__ import annotations

import os
import pickle

import pytest

from pixelmill.settings import load_settings
from producer import Client
from tests.conftest import settings_env
from worker.app import PROCESS_BATCH, create_app

pytestmark = pytest.mark.slow


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # runs on unpickling
        return (os.mkdir, (self.marker,))


def test_a_pickled_message_is_rejected_and_the_queue_goes_on(
    tmp_path, photos, redis_server, start_worker
):
    marker = tmp_path / "pwned"
    settings = load_settings(
        data_dir=tmp_path / "data",
        broker_url=redis_server.url,
        database_url=f"sqlite:///{tmp_path / 'wire.db'}",
        queue="wire-test",
    )
    app = create_app(settings)
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        producer.publish(
            pickle.dumps(((_Exploit(str(marker)),), {}, {})),
            routing_key=settings.queue,
            exchange="",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": PROCESS_BATCH, "id": "evil-1", "lang": "py"},
        )
    with Client(settings) as pm:
        batch = pm.submit("classify", [str(sorted(photos.iterdir())[0])])
        start_worker(settings_env(settings))
        counts = pm.wait(batch.batch_id, timeout=120)
    assert not marker.exists(), "the pickled payload was executed"
    assert counts.by_status == {"done": 1}
