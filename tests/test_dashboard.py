"""`pixelmill dashboard`: its JSON API against a real database (SQLite and PostgreSQL) and a
real Redis, with real batches: auth, XSRF, the controls changing job states, escaping, no
secret in any response, thumbnails that never fail. (The page in a real browser:
tests/test_dashboard_browser.py.)"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pixelmill.dashboard.server import Dashboard
from pixelmill.db.jobs import claim_jobs, write_outcomes
from pixelmill.db.records import Outcome
from pixelmill.db.schema import Batch, Job
from pixelmill.errors import InputError
from pixelmill.producer.client import Client
from pixelmill.producer.output import counts_json
from pixelmill.settings import Settings
from tests.conftest import ROOT, pixelmill, pixelmill_env, skimage_data

# A file named <script>alert(1)</script>.jpg (its "/" makes it a folder "<script>alert(1)<"
# holding "script>.jpg": the input's path ends with the whole text).
HOSTILE = "<script>alert(1)</script>.jpg"
LABEL = "<img src=x onerror=alert(2)>"
SECRET = "hunter2-Sekr1t"
S3_SECRET = "s3-SECRET-value-42"


class Http:
    """A tiny browser: cookies kept, optional basic auth."""

    def __init__(self, base: str, auth: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.auth = auth

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, bytes]:  # the headers: case-insensitive
        req = urllib.request.Request(self.base + path, data=body, method=method)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        if self.auth:
            token = base64.b64encode(self.auth.encode()).decode()
            req.add_header("Authorization", "Basic " + token)
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    def json(self, path: str) -> Any:
        status, _, body = self.request(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def post(self, path: str, data: dict[str, Any] | None = None, xsrf: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if xsrf:
            headers["X-XSRFToken"] = self.json("/api/xsrf")["xsrf"]
        return self.request(path, method="POST", body=json.dumps(data or {}).encode(),
                            headers=headers)  # fmt: skip


@pytest.fixture
def settings(database_url: str, redis_server: Any, tmp_path: Path) -> Settings:
    url = database_url
    if url.startswith("postgresql"):  # trust auth: the password is ignored, but it is in the URL
        url = url.replace("postgres@", f"postgres:{SECRET}@", 1)
    return Settings(
        database_url=url,
        broker_url=redis_server.url,
        data_dir=tmp_path / "data",
        store_url=str(tmp_path / "store"),
        s3_secret_access_key=S3_SECRET,  # type: ignore[arg-type]
        queue="q-" + tmp_path.name[-20:],
    )


@pytest.fixture
def inputs(tmp_path: Path, bad_files: dict[str, Path]) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(skimage_data() / name, folder / name)
    (folder / HOSTILE).parent.mkdir()
    shutil.copy(skimage_data() / "rocket.jpg", folder / HOSTILE)
    shutil.copy(bad_files["text"], folder / "notes.jpg")
    shutil.copy(bad_files["truncated"], folder / "truncated.jpg")
    return folder


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


@pytest.fixture
def served(settings: Settings) -> Iterator[Dashboard]:
    with Dashboard(settings, port=0) as dash:
        yield dash


def _finish(client: Client, batch_id: str, missing: Path | None = None) -> None:
    """What a worker would do, without one: the images done, the bad files failed."""
    with client.sessions.begin() as s:
        ids = list(s.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.seq)))
        claimed = claim_jobs(s, ids, worker="w1", device="cpu")
        outcomes = []
        for job in claimed:
            name = Path(job.input).name
            if name in ("notes.jpg", "truncated.jpg"):
                reason = "cannot identify image file" if name == "notes.jpg" else "truncated"
                outcomes.append(Outcome(job_id=job.job_id, error=f"{job.input}: {reason}"))
            else:
                label = {"label": f"{LABEL} {name}", "score": 0.9}
                outcomes.append(Outcome(job_id=job.job_id, result={"labels": [label]},
                                        model="efficientnet_lite0"))  # fmt: skip
        write_outcomes(s, outcomes)


def test_api_batches_fleet_failures_and_jobs(client, served, inputs, settings):
    sub = client.submit("classify", [str(inputs)], name=f"nightly {HOSTILE}")
    other = client.submit("classify", [str(inputs / "chelsea.png")], name="urgent", again=True)
    http = Http(served.url)

    listed = http.json("/api/batches")["batches"]
    assert [b["batch"] for b in listed] == [other.batch_id, sub.batch_id]  # newest first
    fresh = counts_json(client.status(sub.batch_id))
    assert set(fresh) <= set(listed[1])  # the fields of `status --json`
    assert listed[1]["name"] == f"nightly {HOSTILE}" and listed[1]["queued"] == 6
    assert listed[1]["state"] == "queued" and listed[1]["priority"] == "normal"
    assert [b["batch"] for b in http.json("/api/batches?q=URGENT")["batches"]] == [other.batch_id]
    assert http.json("/api/batches?q=nomatch%25")["batches"] == []
    assert len(http.json("/api/batches?limit=1")["batches"]) == 1

    fleet = http.json("/api/fleet")
    assert fleet["workers"] == []  # none has reported
    assert fleet["queue"]["by_priority"]["normal"] >= 2 and fleet["queue"]["error"] is None

    _finish(client, sub.batch_id)
    assert [b["batch"] for b in http.json("/api/batches?q=finished")["batches"]] == [sub.batch_id]
    batch = http.json(f"/api/batches/{sub.batch_id}")
    assert batch["done"] == 4 and batch["failed"] == 2 and batch["state"] == "finished"
    assert batch["items_per_second"] is not None
    reasons = {f["reason"]: f for f in batch["failures"]}
    assert set(reasons) == {"cannot identify image file", "truncated"}
    assert reasons["truncated"]["inputs"] == [str(inputs / "truncated.jpg")]
    assert sum(batch["throughput"]["per_minute"]) == 6

    page = http.json(f"/api/batches/{sub.batch_id}/jobs?limit=4")
    assert len(page["jobs"]) == 4
    rest = http.json(f"/api/batches/{sub.batch_id}/jobs?offset=4&limit=4")["jobs"]
    assert len(rest) == 2
    after = page["jobs"][-1]["seq"]  # by cursor: the same next page, and back
    assert http.json(f"/api/batches/{sub.batch_id}/jobs?after={after}&limit=4")["jobs"] == rest
    back = http.json(f"/api/batches/{sub.batch_id}/jobs?before={rest[0]['seq']}&limit=4")
    assert back["jobs"] == page["jobs"]
    failed = http.json(f"/api/batches/{sub.batch_id}/jobs?status=failed")["jobs"]
    assert {Path(j["input"]).name for j in failed} == {"notes.jpg", "truncated.jpg"}
    hostile = [j for j in page["jobs"] + rest if j["input"].endswith(HOSTILE)]
    assert hostile[0]["labels"][0]["label"] == f"{LABEL} script>.jpg"
    assert http.request(f"/api/batches/{sub.batch_id}/jobs?status=nope")[0] == 400
    assert http.request("/api/batches/no-such-batch")[0] == 404


def test_controls_need_the_xsrf_token_and_change_job_states(client, served, inputs):
    sub = client.submit("classify", [str(inputs)], name="to control")
    http = Http(served.url)
    path = f"/api/batches/{sub.batch_id}"

    status, _, body = http.post(path + "/pause", xsrf=False)
    assert status == 403, body
    http.json("/api/xsrf")  # the cookie alone is not enough: the header must match it
    assert http.post(path + "/pause", xsrf=False)[0] == 403
    assert _batch(client, sub.batch_id).paused_at is None

    status, _, body = http.post(path + "/pause")
    assert status == 200 and json.loads(body)["changed"] is True
    assert _batch(client, sub.batch_id).paused_at is not None
    assert http.json(path)["state"] == "paused"

    status, _, body = http.post(path + "/resume")
    assert status == 200 and json.loads(body)["queued"] == 6
    assert _batch(client, sub.batch_id).paused_at is None

    status, _, body = http.post(path + "/priority", {"priority": "high"})
    assert status == 200 and _batch(client, sub.batch_id).priority == "high"
    assert http.post(path + "/priority", {"priority": "urgent"})[0] == 400

    with client.sessions.begin() as s:  # one job running: a cancel leaves it to finish
        first = s.scalars(select(Job.id).where(Job.batch_id == sub.batch_id).order_by(Job.seq))
        claim_jobs(s, [first.first() or ""], worker="w1", device="cpu")
    status, _, body = http.post(path + "/cancel")
    assert status == 200 and json.loads(body)["cancelled"] == 5
    assert _states(client, sub.batch_id) == {"running": 1, "cancelled": 5}
    assert http.json(path)["cancelled"] == 5
    assert http.post(path + "/pause")[0] == 400  # a cancelled batch cannot be paused
    assert http.post(path + "/explode")[0] == 404
    assert http.post("/api/batches/no-such-batch/pause")[0] == 404


def test_retry_requeues_the_failed_jobs(client, served, inputs):
    sub = client.submit("classify", [str(inputs)])
    _finish(client, sub.batch_id)
    status, _, body = Http(served.url).post(f"/api/batches/{sub.batch_id}/retry")
    assert status == 200 and json.loads(body)["retried"] == 2
    assert _states(client, sub.batch_id) == {"done": 4, "queued": 2}


def test_no_secret_in_any_response_and_user_text_is_never_html(client, served, inputs):
    sub = client.submit("classify", [str(inputs)], name=HOSTILE)
    with client.sessions.begin() as s:  # an error that quotes a URL with its password
        job = s.scalars(select(Job).where(Job.batch_id == sub.batch_id)).first()
        assert job is not None
        job.status, job.error = "failed", f"database: postgresql://me:{SECRET}@db/x refused"  # type: ignore[assignment]
    http = Http(served.url)
    bodies = []
    for path in ("/", "/api/fleet", "/api/batches", f"/api/batches/{sub.batch_id}",
                 f"/api/batches/{sub.batch_id}/jobs", "/api/batches/nope"):  # fmt: skip
        status, headers, body = http.request(path)
        bodies.append(body)
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        if path.startswith("/api"):
            assert headers["Content-Type"].startswith("application/json")
    text = b"\n".join(bodies).decode()
    assert SECRET not in text and S3_SECRET not in text
    assert "postgresql://me:***@db/x" in text
    assert "<script>alert" not in bodies[0].decode()  # the page holds no user text itself
    assert json.loads(bodies[2])["batches"][0]["name"] == HOSTILE  # JSON, inserted as text


def test_thumbnails_and_placeholders(client, served, inputs):
    sub = client.submit("classify", [str(inputs)])
    (inputs / "coffee.png").unlink()  # gone since it was submitted
    http = Http(served.url)
    with client.sessions() as s:
        jobs = {Path(j.input).name: j.id for j in s.scalars(select(Job).where(
            Job.batch_id == sub.batch_id))}  # fmt: skip
    status, headers, body = http.request(f"/thumb/{jobs['chelsea.png']}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert "X-Pixelmill-Placeholder" not in headers and body[:2] == b"\xff\xd8"
    from PIL import Image

    assert max(Image.open(io.BytesIO(body)).size) <= 256
    for name in ("coffee.png", "notes.jpg", "truncated.jpg"):
        status, headers, body = http.request(f"/thumb/{jobs[name]}")
        assert status == 200 and headers.get("X-Pixelmill-Placeholder") == "1", name
        assert body[:2] == b"\xff\xd8"
    status, headers, _ = http.request("/thumb/00000000-0000-0000-0000-000000000000")
    assert status == 200 and headers.get("X-Pixelmill-Placeholder") == "1"
    assert http.request("/thumb/..%2F..%2Fetc%2Fpasswd")[0] == 404


def test_export_downloads(client, served, inputs):
    sub = client.submit("classify", [str(inputs)])
    _finish(client, sub.batch_id)
    http = Http(served.url)
    status, headers, body = http.request(f"/api/batches/{sub.batch_id}/export?format=csv")
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done", "failed"}
    status, _, body = http.request(f"/api/batches/{sub.batch_id}/export?format=parquet")
    assert status == 200 and body[:4] == b"PAR1"
    assert http.request(f"/api/batches/{sub.batch_id}/export?format=xls")[0] == 400


def test_metrics_route(served):
    status, headers, body = Http(served.url).request("/metrics")
    assert status == 200, body[:500]
    assert headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_password_that_is_also_a_word_masks_secrets_not_data(settings, client, inputs):
    """The broker's password is the queue's name and the S3 secret a quote: the secrets go
    nowhere, and the data that merely contains their text stays intact (valid JSON, a
    parseable /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    word = settings.queue
    host = settings.broker_url.split("://", 1)[1]
    settings = settings.model_copy(update={
        "broker_url": f"redis://:{word}@{host}",
        "s3_secret_access_key": Settings(s3_secret_access_key='"').s3_secret_access_key,  # type: ignore[arg-type]
    })  # fmt: skip
    sub = client.submit("classify", [str(inputs)], name=f"nightly {word}")
    with client.sessions.begin() as s:  # an error that quotes the broker URL
        job = s.scalars(select(Job).where(Job.batch_id == sub.batch_id)).first()
        assert job is not None
        job.status, job.error = "failed", f"broker: redis://:{word}@{host} refused; key {word}"  # type: ignore[assignment]
    with Dashboard(settings, port=0) as dash:
        http = Http(dash.url)
        fleet = http.json("/api/fleet")
        assert fleet["queue"]["name"] == word
        batch = http.json(f"/api/batches/{sub.batch_id}")
        assert batch["name"] == f"nightly {word}"
        reasons = [f["reason"] for f in batch["failures"]]
        assert any("redis://:***@" in r and word not in r for r in reasons), reasons
        status, _, body = http.request("/metrics")
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert "pixelmill_jobs" in names
        status, _, body = http.post(f"/api/batches/{sub.batch_id}/priority",
                                    {"priority": ["high"]})  # fmt: skip
        assert status == 400, body  # a bad value, not a crash
        assert json.loads(body)["status"] == 400


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_basic_auth_on_every_route(settings, client, inputs):
    sub = client.submit("classify", [str(inputs)])
    creds = [("ops", "pa:ss"), ("viewer", "v1ew")]
    with Dashboard(settings, port=0, address="127.0.0.1", credentials=creds) as dash:
        routes = ["/", "/api/fleet", "/api/batches", f"/api/batches/{sub.batch_id}",
                  f"/api/batches/{sub.batch_id}/jobs", "/metrics", "/static/dashboard.js",
                  "/thumb/x", "/api/xsrf", "/nowhere"]  # fmt: skip
        for path in routes:
            status, headers, _ = Http(dash.url).request(path)
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Basic")
            assert Http(dash.url, "ops:wrong").request(path)[0] == 401, path
        assert Http(dash.url, "ops:pa:ss").request("/")[0] == 200
        assert Http(dash.url, "viewer:v1ew").request("/static/dashboard.css")[0] == 200
        http = Http(dash.url, "ops:pa:ss")
        assert http.json(f"/api/batches/{sub.batch_id}")["batch"] == sub.batch_id
        assert http.post(f"/api/batches/{sub.batch_id}/pause")[0] == 200
        # No credentials on a POST: 401 (asked for them), before the XSRF check's 403.
        status, _, _ = Http(dash.url).post(f"/api/batches/{sub.batch_id}/resume", xsrf=False)
        assert status == 401


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_loopback_only_without_auth(settings, served):
    with pytest.raises(InputError, match="PIXELMILL_DASHBOARD_BASIC_AUTH"):
        Dashboard(settings, address="0.0.0.0", port=0)
    # A page elsewhere whose name resolves to 127.0.0.1 (DNS rebinding) gets nothing.
    http = Http(served.url)
    assert http.request("/api/batches", headers={"Host": "evil.example:80"})[0] == 403
    assert http.request("/api/batches", headers={"Host": f"127.0.0.1:{served.port}"})[0] == 200


@pytest.mark.slow
def test_the_command_stops_on_sigterm_and_sighup_while_serving(tmp_path):
    """Stop signals end `pixelmill dashboard` (exit 0) while requests are being served: they
    are taken in its main thread, never inside a request's callback (where they were once
    logged and ignored, leaving only SIGKILL)."""
    import re
    import signal
    import subprocess
    import sys
    import threading

    env = pixelmill_env(data_dir=str(tmp_path))
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-m", "pixelmill", "dashboard", "--port", "0"],
                                env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"http://\S+", line)
        assert found, line
        url = found.group(0)
        halt = threading.Event()

        def hammer(url: str = url, halt: threading.Event = halt) -> None:
            while not halt.is_set():
                with contextlib.suppress(OSError):
                    Http(url).request("/api/batches?limit=500")

        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.5)
            proc.send_signal(sig)
            assert proc.wait(15) == 0, sig
        finally:
            halt.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


@pytest.mark.slow
def test_the_command_refuses_a_public_address_without_auth(tmp_path):
    env = pixelmill_env(data_dir=str(tmp_path))
    proc = pixelmill("dashboard", "--address=0.0.0.0", env=env, timeout=120)
    assert proc.returncode == 2 and "PIXELMILL_DASHBOARD_BASIC_AUTH" in proc.stderr
    env["PIXELMILL_DASHBOARD_BASIC_AUTH"] = "nopassword"
    proc = pixelmill("dashboard", "--address=0.0.0.0", env=env, timeout=120)
    assert proc.returncode == 2 and "user:password" in proc.stderr
    assert "--basic-auth" not in pixelmill("dashboard", "--help", env=env).stdout
    assert ROOT.exists()


def _batch(client: Client, batch_id: str) -> Batch:
    with client.sessions() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None
        s.expunge(batch)
        return batch


def _states(client: Client, batch_id: str) -> dict[str, int]:
    return {
        k: v
        for k, v in client.status(batch_id).by_status.items()
        if v and k in ("queued", "running", "done", "failed", "cancelled")
    }


@pytest.mark.slow
def test_run_serves_the_dashboard_for_its_duration(tmp_path, photos):
    import re
    import subprocess
    import sys

    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixelmill", "run", "classify", str(photos), "--json",
         "--dashboard", "--dashboard-port=0"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    url = None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        found = re.search(r"dashboard: (http://\S+)", line)
        if found:
            url = found.group(1)
            break
    assert url is not None, seen
    status, _, body = Http(url).request("/api/fleet")  # the run is still going
    assert status == 200 and "workers" in json.loads(body)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(seen) + err
    assert len(out.splitlines()) == 4
    with pytest.raises(OSError):  # gone with the run
        urllib.request.urlopen(url, timeout=5)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_generated_images_in_the_contact_sheet(client, served, settings):
    """A generate job: its card shows its prompt and seed, its thumbnail the stored PNG (read
    from the object store), and before it has one the placeholder (its input is a prompt)."""
    from PIL import Image

    from pixelmill.db.records import ArtifactRecord
    from pixelmill.db.store import artifact_key, open_store

    prompt = '<b onmouseover="alert(3)">a lighthouse</b>'
    sub = client.submit("generate", prompts=[prompt], count=2, seed=7, model="tiny-sd-stand-in")
    store = open_store(settings.resolved_store_url(), settings)
    with client.sessions.begin() as s:
        ids = list(s.scalars(select(Job.id).where(Job.batch_id == sub.batch_id).order_by(Job.seq)))
        claim_jobs(s, ids[:1], worker="w1", device="cpu")
        png = io.BytesIO()
        Image.new("RGB", (512, 512), (20, 90, 200)).save(png, "PNG")
        key = artifact_key(batch_id=sub.batch_id, job_id=ids[0])
        stored = store.put(key, png.getvalue(), content_type="image/png")
        artifact = ArtifactRecord(key=key, uri=stored.uri, content_type="image/png",
                                  size=stored.size, sha256=stored.sha256, seed=7)  # fmt: skip
        result = {"prompt": prompt, "seed": 7, "steps": 1, "guidance": 0.0, "width": 512,
                  "height": 512}  # fmt: skip
        write_outcomes(s, [Outcome(job_id=ids[0], result=result, model="m",
                                   artifacts=(artifact,))])  # fmt: skip
    http = Http(served.url)
    jobs = http.json(f"/api/batches/{sub.batch_id}/jobs")["jobs"]
    assert jobs[0]["prompt"] == prompt and jobs[0]["seed"] == 7 and jobs[0]["artifact"] is True
    assert jobs[1]["artifact"] is False and jobs[1]["status"] == "queued"
    status, headers, body = http.request(f"/thumb/{ids[0]}?kind=artifact")
    assert status == 200 and headers.get("X-Pixelmill-Placeholder") is None
    thumb = Image.open(io.BytesIO(body))
    assert thumb.size == (256, 256) and thumb.getpixel((128, 128))[2] > 150  # the blue PNG
    status, headers, _ = http.request(f"/thumb/{ids[1]}")
    assert status == 200 and headers.get("X-Pixelmill-Placeholder") == "1"
