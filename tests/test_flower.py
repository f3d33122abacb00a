"""`pixelmill flower`: Flower on pixelmill's broker shows the device workers, behind auth."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.conftest import ROOT, pixelmill, pixelmill_env
from tests.services import free_port
from tests.test_compose import healthcheck

pytestmark = pytest.mark.slow


def _get(url: str, auth: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def test_flower_shows_the_worker_and_requires_its_password(tmp_path, redis_server, start_worker):
    env = pixelmill_env(data_dir=str(tmp_path), broker_url=redis_server.url)
    start_worker(env)
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "pixelmill", "flower", f"--port={port}",
         "--basic-auth=ops:s3cret"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(tmp_path / "flower.log").open("w"),
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/workers"
        deadline = time.monotonic() + 90
        body = ""
        while time.monotonic() < deadline:
            try:
                status, body = _get(url, "ops:s3cret")
                if status == 200 and "pixelmill-cpu@" in body:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert "pixelmill-cpu@" in body
        # pixelmill's task among Flower's own registered tasks, and among the worker's.
        log = (tmp_path / "flower.log").read_text()
        assert "'pixelmill.process_batch'" in log.split("Registered tasks", 1)[1], log
        # Flower asks the worker (a broadcast it answers within 1 s, or not at all): on a busy
        # machine, again until it answered.
        deadline = time.monotonic() + 90
        while True:
            status, workers = _get(f"http://127.0.0.1:{port}/api/workers?refresh=1", "ops:s3cret")
            answered = json.loads(workers or "{}").values()
            registered = [t for w in answered for t in w.get("registered", [])]
            if status == 200 and registered or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status == 200 and "pixelmill.process_batch" in registered
        assert _get(url)[0] == 401
        assert _get(url, "ops:wrong")[0] == 401
        # docker-compose.yml's healthchecks, run as Docker runs them in the containers: Flower's
        # on its port, the worker's on this host's node (cpu here, cuda0 in the container).
        flower_check = _compose_check("flower", {"5555": str(port)}, env)
        assert flower_check.returncode == 0, flower_check.stderr
        worker_check = _compose_check("worker-gpu0", {"pixelmill-cuda0@": "pixelmill-cpu@"}, env)
        assert worker_check.returncode == 0, worker_check.stderr
        absent = {"pixelmill-cuda0@": "pixelmill-cuda7@", "-t 10": "-t 2"}
        assert _compose_check("worker-gpu0", absent, env).returncode != 0  # no such worker
    finally:
        flower.terminate()
        flower.wait(30)
    assert _compose_check("flower", {"5555": str(port)}, env).returncode != 0


def _compose_check(service: str, swap: dict[str, str], env: dict[str, str]) -> Any:
    """Run a service's healthcheck from docker-compose.yml with ``swap``'s replacements, in the
    environment the container has (python is this interpreter, HOSTNAME is set by Docker)."""
    argv = [arg for arg in healthcheck(service)]
    for old, new in swap.items():
        argv = [arg.replace(old, new) for arg in argv]
    argv = [sys.executable if arg == "python" else arg for arg in argv]
    argv = [arg.replace("python -m", f"{sys.executable} -m") for arg in argv]
    env = dict(env, HOSTNAME=socket.gethostname())
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_flower_refuses_a_public_address_without_auth(tmp_path):
    env = pixelmill_env(data_dir=str(tmp_path))
    proc = pixelmill("flower", "--address=0.0.0.0", env=env)
    assert proc.returncode == 2 and "--basic-auth" in proc.stderr
