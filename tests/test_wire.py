"""The wire is JSON only: a pickled message is refused by a real worker, never executed."""

from __future__ import annotations

import json
import os
import pickle
import signal

import pytest

from pixelmill.producer import Client
from pixelmill.settings import load_settings
from pixelmill.wire import PROCESS_BATCH, create_app
from tests.conftest import PHOTOS, pixelmill, pixelmill_env, settings_env

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


def test_a_tls_broker_is_verified_and_carries_the_work(tmp_path, redis_server, start_worker,
                                                      photos):  # fmt: skip
    """rediss:// through a real TLS endpoint (a test CA) in front of a real Redis: a worker and
    a producer that trust the CA do the work; one that does not is refused (exit 3)."""
    from tests.services import start_tls_proxy

    proxy = start_tls_proxy(tmp_path / "tls", redis_server.port)
    try:
        url = f"rediss://127.0.0.1:{proxy.port}/0"
        env = pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=url,
                            broker_ca_certs=str(proxy.ca_path),
                            database_url=f"sqlite:///{tmp_path / 'tls.db'}")  # fmt: skip
        untrusted = {k: v for k, v in env.items() if k != "PIXELMILL_BROKER_CA_CERTS"}
        refused = pixelmill("submit", "classify", str(photos), env=untrusted)
        assert refused.returncode == 3, refused.stderr
        assert "certificate" in refused.stderr.lower() and "Traceback" not in refused.stderr
        sub = pixelmill("submit", "classify", str(photos), "--json", env=env)
        assert sub.returncode == 0, sub.stderr
        batch = json.loads(sub.stdout)["batch"]
        worker = start_worker(env)
        done = pixelmill("status", batch, "--wait", "--json", env=env, timeout=300)
        assert json.loads(done.stdout)["done"] == len(PHOTOS)
        worker.send_signal(signal.SIGTERM)  # before the TLS endpoint goes away
        assert worker.wait(60) == 0
    finally:
        proxy.stop()
