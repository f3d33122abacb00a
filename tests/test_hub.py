"""A hub model on a host that cannot reach the hub, or a name the hub does not know, fails at
once with what happened (no minutes of retries); a model already in the local cache loads from
it. The hub is the one edge we cannot run here: a local HTTP server stands in for it, speaking
on the port that ``HF_ENDPOINT`` names, and counts what it is asked."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from pixelmill.models import hub
from tests.conftest import pixelmill, pixelmill_env
from tests.tiny_models import build_tiny_vit_classifier

SHA = "0123456789abcdef0123456789abcdef01234567"


class NoSuchModelHub:
    """Answers 404 (as the hub does for an unknown repository) to every request."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        seen = self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                seen.append(self.path)
                body = json.dumps({"error": "Repository not found"}).encode()
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SilentHub:
    """Accepts connections and never answers: a hub behind a black hole."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _cache_model(hf_home: Path, name: str) -> None:
    """A tiny classifier in the Hugging Face cache's own layout, as `hf download` leaves it."""
    repo = hf_home / "hub" / f"models--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    build_tiny_vit_classifier(repo / "snapshots" / SHA)


def _env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))
    return env


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def fresh_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """In this process: the hub not yet asked, the cache in tmp_path, online mode."""
    from huggingface_hub import constants

    hub.forget()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    yield
    hub.forget()


def test_a_name_the_hub_does_not_know_fails_at_once_asked_once(tmp_path, image):
    fake = NoSuchModelHub()
    try:
        proc = pixelmill(
            "run", "classify", str(image), "--model", "no/such-model-xyz", "--json",
            env=_env(tmp_path, fake.url),
        )  # fmt: skip
    finally:
        fake.close()
    assert proc.returncode == 1, proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert f"{fake.url} has no model 'no/such-model-xyz' (HTTP 404): check the name" in error
    assert "as the hub spells it" in error and "hf download" not in error
    # One question, no retry, and no file asked for after the hub said there is no such model.
    assert fake.paths == ["/api/models/no/such-model-xyz"]


def test_unreachable_hub_loads_a_cached_model_from_the_cache_and_fails_others_at_once(
    tmp_path, image
):
    _cache_model(tmp_path / "hf", "tiny/vit")
    env = _env(tmp_path, _closed_port())
    done = pixelmill("run", "classify", str(image), "--model", "tiny/vit", "--json", env=env)
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert line["status"] == "done" and line["revision"] == SHA

    failed = pixelmill("run", "classify", str(image), "--model", "no/where", "--json", env=env)
    assert failed.returncode == 1, failed.stderr
    error = json.loads(failed.stdout)["error"]
    assert "cannot be reached from this host (ConnectError" in error
    assert f"not in this host's Hugging Face cache ({tmp_path / 'hf' / 'hub'})" in error
    assert "`hf download no/where`" in error
    assert "Retrying" not in (tmp_path / "data" / "logs").joinpath("worker-cpu.log").read_text()


def test_a_hub_that_does_not_answer_is_asked_once_per_process(fresh_hub, monkeypatch, tmp_path):
    """A black-holed hub costs one probe's timeout, once: every later load reads the cache."""
    from huggingface_hub import constants

    silent = SilentHub()
    monkeypatch.setattr(constants, "ENDPOINT", silent.url)
    monkeypatch.setattr(hub, "PROBE_SECONDS", 0.5)
    _cache_model(tmp_path / "hf", "tiny/cached")
    try:
        with pytest.raises(hub.HubError, match="cannot be reached from this host") as first:
            hub.hub_options("a/missing")
        assert first.value.offline
        assert hub.hub_options("tiny/cached") == {"local_files_only": True}
        with pytest.raises(hub.HubError, match="not in this host's Hugging Face cache"):
            hub.hub_options("b/missing")
        assert len(silent.accepted) == 1
    finally:
        silent.close()


def test_hf_hub_offline_reads_only_the_cache_and_asks_nothing(fresh_hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    silent = SilentHub()
    monkeypatch.setattr(constants, "ENDPOINT", silent.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _cache_model(tmp_path / "hf", "tiny/cached")
    try:
        assert hub.hub_options("tiny/cached") == {"local_files_only": True}
        with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set, and the model is not"):
            hub.hub_options("a/missing")
        assert silent.accepted == []
    finally:
        silent.close()
