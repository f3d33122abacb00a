"""Prometheus /metrics (``pixelmill.dashboard.prometheus.exposition``) against the real parts:
Redis, SQLite and PostgreSQL, and real worker processes writing their counts and reports."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from pixelmill.dashboard import prometheus as metrics
from pixelmill.dashboard.prometheus import exposition
from pixelmill.db.fleet import list_workers
from pixelmill.db.jobs import create_batch
from pixelmill.db.metric_totals import SIZE_BUCKETS, add_totals, histogram
from pixelmill.db.schema import Batch, Job
from pixelmill.producer import Client
from pixelmill.settings import Settings, load_settings
from pixelmill.wire import NOOP, PRIORITIES, create_app, enqueue
from tests.conftest import ROOT, NullGate, settings_env
from tests.services import free_port, start_redis

T = TypeVar("T")
Families = dict[str, Any]


def _until(check: Callable[[], T], what: str, timeout: float = 120) -> T:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


@pytest.fixture
def uncached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scrape reads the sources again (the 2 s cache has its own test)."""
    monkeypatch.setattr(metrics, "CACHE_SECONDS", 0.0)
    monkeypatch.setattr(metrics, "MAX_SHARE", 1e9)


def scrape(settings: Settings, sessions: Any, app: Any) -> Families:
    body, content_type = exposition(settings, sessions, app)
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families: Families, sample: str, **labels: str) -> float:
    """The one sample named ``sample`` whose labels include ``labels``; 0 if none."""
    family = next((f for f in families.values() if any(s.name == sample for s in f.samples)), None)
    if family is None:
        return 0.0
    found = [
        s.value
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, (sample, labels, found)
    return found[0] if found else 0.0


def _settings(tmp_path: Path, database_url: str, broker_url: str, **extra: Any) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url=broker_url,
        queue=f"q-{uuid.uuid4().hex[:8]}",  # this test's own lists on the shared Redis
        **extra,
    )


def _images(folder: Path, n: int, first: int = 0) -> list[str]:
    """``n`` small PNGs, each of its own bytes (colour ``first`` + i: none is reused from
    another)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(first, first + n):
        path = folder / f"img{i:04d}.png"
        Image.new("RGB", (16, 16), (i % 256, (i // 256) % 256, 77)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def workers(tmp_path: Path, spawn: Any) -> Callable[..., subprocess.Popen[bytes]]:
    """`pixelmill worker --devices cpu --cpu-workers N`; SIGTERM (drain) at the end."""

    def start(
        settings: Settings, n: int = 1, gate: NullGate | None = None
    ) -> subprocess.Popen[bytes]:
        env = settings_env(settings)
        if gate is not None:  # the null model finishes an item only when the test lets it
            env.update(gate.env)
        return spawn(  # type: ignore[no-any-return]
            "worker", "--devices", "cpu", "--cpu-workers", str(n), env=env
        )

    return start


def _check_histogram(families: Families, name: str, **labels: str) -> tuple[float, float]:
    """Cumulative buckets never go down, +Inf equals _count; returns (count, sum)."""
    family = families[name]
    assert family.type == "histogram"
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for s in family.samples
        if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())
    )
    assert buckets and math.isinf(buckets[-1][0])
    counts = [n for _, n in buckets]
    assert counts == sorted(counts), counts
    count = value(families, f"{name}_count", **labels)
    assert buckets[-1][1] == count
    return count, value(families, f"{name}_sum", **labels)


# ---- real workers ------------------------------------------------------------------------------


@pytest.mark.slow
def test_items_counted_per_outcome_after_a_real_batch_with_one_bad_file(
    tmp_path, photos, bad_files, database_url, sessions, redis_server, workers, uncached
):
    settings = _settings(tmp_path, database_url, redis_server.url, batch_size=2)
    inputs = sorted(str(p) for p in photos.iterdir()) + [str(bad_files["corrupt"])]
    app = create_app(settings)
    with Client(settings) as pm:
        batch = pm.submit("classify", inputs)  # the packaged classifier, on real photographs
        assert scrape(settings, sessions, app)["pixelmill_jobs"].samples  # before any work
        workers(settings)
        counts = pm.wait(batch.batch_id, timeout=300)
    assert counts.by_status == {"done": 4, "failed": 1}
    families = scrape(settings, sessions, app)
    model = {"task": "classify", "model": "efficientnet_lite0", "device": "cpu"}
    done = value(families, "pixelmill_items_processed_total", outcome="done", **model)
    failed = value(families, "pixelmill_items_processed_total", outcome="failed", **model)
    assert (done, failed) == (4, 1)
    assert value(families, "pixelmill_jobs", state="done") == 4
    assert value(families, "pixelmill_jobs", state="failed") == 1
    assert value(families, "pixelmill_jobs", state="queued") == 0
    # 5 inputs, 2 per message: 3 messages; the 4 decoded photos went through forward passes
    # (the corrupt file failed before one), 2 at a time on the CPU.
    messages, _ = _check_histogram(families, "pixelmill_batch_seconds", **model)
    assert messages == 3
    passes, items = _check_histogram(families, "pixelmill_batch_size", **model)
    assert items == 4 and passes == 2
    forward_passes, seconds = _check_histogram(families, "pixelmill_forward_seconds", **model)
    assert forward_passes == passes and seconds > 0
    assert value(families, "pixelmill_up", source="database") == 1
    assert value(families, "pixelmill_up", source="redis") == 1


@pytest.mark.slow
def test_two_workers_add_up_and_a_killed_worker_loses_no_counts(
    tmp_path, redis_server, workers, uncached, null_gate
):
    """Two device worker processes share the work; one is killed (SIGKILL) mid-batch, holding
    jobs, and its supervisor starts it again: every job is counted exactly once, the workers
    table names both, with a fresh heartbeat, and the restarted one under the same name. The
    null model finishes an item only when the gate lets it, so each step happens in the state
    it names however loaded the machine is."""
    database_url = f"sqlite:///{tmp_path / 'pm.db'}"
    settings = _settings(
        tmp_path, database_url, redis_server.url, batch_size=2,
        lease_seconds=4, queued_lease_seconds=3, reconcile_interval=1,
    )  # fmt: skip
    app = create_app(settings)
    n = 60
    with Client(settings) as pm:
        batch = pm.submit("classify", _images(tmp_path / "a", n), model="null")
        sessions = pm.sessions
        supervisor = workers(settings, n=2, gate=null_gate)

        def holding() -> dict[str, int]:
            """Worker (name/pid) -> the jobs it has claimed and not finished."""
            with sessions() as s:
                rows = s.execute(
                    select(Job.worker, func.count()).where(Job.status == "running")
                    .group_by(Job.worker)
                ).all()  # fmt: skip
            return {str(w): c for w, c in rows}

        _until(lambda: len(holding()) == 2, "both workers claimed jobs")

        def both_busy() -> list[Any]:
            """Both workers' reports count finished items; until then, one more item may
            finish whenever every item let through so far has."""
            if null_gate.waiting():
                null_gate.allow(int(null_gate.taken.read_text()) + 1)
            with sessions() as s:
                found = [w for w in list_workers(s) if w.items > 0]
            return found if len(found) == 2 else []

        both = _until(both_busy, "both workers finished some items")
        families = scrape(settings, sessions, app)
        for w in both:
            labels = {"worker": w.name, "host": w.host, "device": "cpu"}
            assert w.name.startswith("pixelmill-cpu") and w.name.endswith("@" + w.host)
            assert value(families, "pixelmill_worker_up", **labels) == 1
            assert 0 <= value(families, "pixelmill_worker_heartbeat_age_seconds", **labels) < 10
        victim = both[0]
        # Mid-batch: it holds claimed jobs (waiting at the gate), which come back through
        # their leases.
        _until(lambda: holding().get(f"{victim.name}/{victim.pid}"), "the victim holds jobs")
        os.kill(victim.pid, signal.SIGKILL)

        def restarted() -> bool:
            """Its successor runs under its name and is ready (consuming), not only started."""
            with sessions() as s:
                return any(w.name == victim.name and w.pid != victim.pid
                           and w.state in ("idle", "busy") for w in list_workers(s))  # fmt: skip

        _until(restarted, "the killed worker restarted, reported under its name and got ready")
        null_gate.open()
        counts = pm.wait(batch.batch_id, timeout=300)
        assert counts.by_status == {"done": n}
        second = pm.submit("classify", _images(tmp_path / "b", 10, first=n), model="null")
        assert pm.wait(second.batch_id, timeout=300).by_status == {"done": 10}
        families = scrape(settings, sessions, app)
        labels = {"task": "classify", "model": "null", "device": "cpu"}
        assert (
            value(families, "pixelmill_items_processed_total", outcome="done", **labels) == n + 10
        )
        assert value(families, "pixelmill_items_processed_total", outcome="failed", **labels) == 0
        assert value(families, "pixelmill_jobs", state="done") == n + 10
        # Each message's size went into the histogram once: 70 items in all (a message the
        # killed worker never finished is counted by the one that did).
        _, items = _check_histogram(families, "pixelmill_batch_size", **labels)
        assert items >= n + 10
        with sessions() as s:
            rows = {w.name: w for w in list_workers(s)}
        assert len(rows) == 2 and all(w.state in ("idle", "busy") for w in rows.values())
        assert all(sum(c for _, c in w.recent) == w.items for w in rows.values())
        assert sum(w.items for w in rows.values()) > 0
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(120) == 0
        with sessions() as s:
            assert {w.state for w in list_workers(s)} == {"stopped"}
        families = scrape(settings, sessions, app)
        assert all(s.value == 0 for s in families["pixelmill_worker_up"].samples)


# ---- the queue ---------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_queue_depth_per_priority_sums_every_list_a_priority_uses(
    tmp_path, database_url, sessions, redis_server, uncached
):
    settings = _settings(tmp_path, database_url, redis_server.url)
    app = create_app(settings)
    sent = {"high": 3, "normal": 2, "low": 5}
    for priority, messages in sent.items():
        enqueue(app, [str(uuid.uuid4()) for _ in range(messages * 2)], 2, priority)
    with app.producer_or_acquire() as producer:  # a message without a priority: step 0, high
        app.send_task(NOOP, producer=producer)
    # Each priority really is its own Redis list (kombu's priority steps).
    client = redis_server.client()
    assert client.llen(settings.queue) == sent["high"] + 1
    assert set(PRIORITIES) == set(sent)
    with sessions.begin() as s:
        for priority, n in (("high", 4), ("normal", 7), ("low", 10), ("low", 2)):
            create_batch(s, task="classify", model="null", priority=priority,
                         inputs=[f"/in/{priority}/{i}.png" for i in range(n)])  # fmt: skip
        paused = create_batch(s, task="classify", model="null", priority="high",
                              inputs=["/in/paused.png"])  # fmt: skip
        s.execute(
            update(Batch).where(Batch.id == paused.batch_id).values(paused_at=Batch.created_at)
        )
    time.sleep(0.05)
    families = scrape(settings, sessions, app)
    for priority, messages in sent.items():
        got = value(families, "pixelmill_queue_messages", queue=settings.queue, priority=priority)
        assert got == messages + (1 if priority == "high" else 0), priority
    assert value(families, "pixelmill_queue_messages", priority="other") == 0
    queued = {p: value(families, "pixelmill_queued_items", priority=p) for p in sent}
    assert queued == {"high": 4 + 1, "normal": 7, "low": 12}
    assert value(families, "pixelmill_jobs", state="queued") == 24
    ages = {p: value(families, "pixelmill_oldest_queued_age_seconds", priority=p) for p in sent}
    assert all(0 < age < 60 for age in ages.values()), ages
    # The low batches were made last but one; the paused one, the very last, is no one's age.
    assert ages["high"] > ages["normal"] > ages["low"]


# ---- names, caching, sources away --------------------------------------------------------------


def _populate(sessions: Any) -> None:
    from pixelmill.db.fleet import report_worker
    from pixelmill.db.records import WorkerReport

    with sessions.begin() as s:
        conn = s.connection()
        create_batch(s, task="classify", model="null", inputs=["/in/a.png", "/in/b.png"])
        add_totals(conn, histogram("forward_seconds", "classify", "null", "cuda:0",
                                   [0.001, 0.02, 0.02, 0.7, 9000.0]))  # fmt: skip
        add_totals(conn, histogram("batch_seconds", "classify", "null", "cuda:0", [1.5]))
        add_totals(conn, histogram("batch_size", "classify", "null", "cuda:0", [32, 32, 5],
                                   SIZE_BUCKETS))  # fmt: skip
        report_worker(s, WorkerReport(
            name="pixelmill-cuda0@gpu1", host="gpu1", device="cuda:0", pid=42, state="busy",
            models=("null",), batch_id="b-1", items=3, recent=((29000000, 3),),
            memory_used=1 << 30, memory_total=80 << 30, utilization=0.75,
        ))  # fmt: skip


def test_names_follow_prometheus_conventions(tmp_path, redis_server, sessions, uncached):
    settings = _settings(tmp_path, "sqlite:///unused.db", redis_server.url)
    _populate(sessions)
    families = scrape(settings, sessions, create_app(settings))
    assert {
        "pixelmill_items_processed", "pixelmill_forward_seconds", "pixelmill_batch_seconds",
        "pixelmill_batch_size", "pixelmill_queue_messages", "pixelmill_queued_items",
        "pixelmill_oldest_queued_age_seconds", "pixelmill_jobs",
        "pixelmill_worker_heartbeat_age_seconds", "pixelmill_worker_up",
        "pixelmill_device_memory_used_bytes", "pixelmill_device_memory_total_bytes",
        "pixelmill_gpu_utilization_ratio", "pixelmill_up", "pixelmill_scrape_errors",
    } <= set(families)  # fmt: skip
    for family in families.values():
        assert family.name.startswith("pixelmill_"), family.name
        for sample in family.samples:
            assert sample.name.startswith(family.name)
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
            assert not {"batch", "job", "batch_id", "job_id", "id"} & set(sample.labels)
            assert "b-1" not in sample.labels.values()
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_size"))
    labels = {"worker": "pixelmill-cuda0@gpu1", "host": "gpu1", "device": "cuda:0"}
    assert value(families, "pixelmill_device_memory_used_bytes", **labels) == 1 << 30
    assert value(families, "pixelmill_device_memory_total_bytes", **labels) == 80 << 30
    assert value(families, "pixelmill_gpu_utilization_ratio", **labels) == 0.75
    assert value(families, "pixelmill_worker_up", **labels) == 1
    gpu = {"task": "classify", "model": "null", "device": "cuda:0"}
    count, total = _check_histogram(families, "pixelmill_forward_seconds", **gpu)
    assert (count, total) == (5, pytest.approx(9000.741))
    assert value(families, "pixelmill_forward_seconds_bucket", le="0.025", **gpu) == 3
    assert value(families, "pixelmill_forward_seconds_bucket", le="300.0", **gpu) == 4
    assert _check_histogram(families, "pixelmill_batch_size", **gpu) == (3, 69)
    assert value(families, "pixelmill_batch_size_bucket", le="16.0", **gpu) == 1


def test_a_scrape_while_redis_is_down_still_has_the_database_figures(tmp_path, sessions, uncached):
    redis = start_redis(tmp_path / "redis")
    try:
        settings = _settings(tmp_path, "sqlite:///unused.db", redis.url)
        app = create_app(settings)
        _populate(sessions)
        assert value(scrape(settings, sessions, app), "pixelmill_up", source="redis") == 1
        redis.stop()
        started = time.monotonic()
        families = scrape(settings, sessions, app)
        assert time.monotonic() - started < metrics.WAIT_SECONDS + 2
    finally:
        if redis.process.poll() is None:
            redis.stop()
    assert value(families, "pixelmill_up", source="redis") == 0
    assert value(families, "pixelmill_up", source="database") == 1
    assert value(families, "pixelmill_scrape_errors_total", source="redis") >= 1
    assert "pixelmill_queue_messages" not in families
    assert value(families, "pixelmill_jobs", state="queued") == 2
    assert value(families, "pixelmill_queued_items", priority="normal") == 2
    assert _check_histogram(families, "pixelmill_forward_seconds", device="cuda:0")[0] == 5


def test_a_scrape_while_the_database_is_away_still_has_the_queue(tmp_path, redis_server, uncached):
    from pixelmill.db.engine import make_engine, make_sessionmaker

    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://pixelmill:secret@127.0.0.1:{port}/pixelmill"
    settings = _settings(tmp_path, url, redis_server.url)
    app = create_app(settings)
    enqueue(app, ["a", "b"], 1, "low")
    engine = make_engine(url)
    try:
        body, _ = exposition(settings, make_sessionmaker(engine), app)
    finally:
        engine.dispose()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert value(families, "pixelmill_up", source="database") == 0
    assert value(families, "pixelmill_up", source="redis") == 1
    assert value(families, "pixelmill_queue_messages", priority="low") == 2
    assert "pixelmill_jobs" not in families and "pixelmill_items_processed" not in families
    assert b"secret" not in body


def test_reads_are_cached_for_two_seconds(tmp_path, redis_server, sessions):
    settings = _settings(tmp_path, "sqlite:///unused.db", redis_server.url)
    app = create_app(settings)
    with sessions.begin() as s:
        create_batch(s, task="classify", model="null", inputs=["/in/a.png"])
    first = scrape(settings, sessions, app)
    with sessions.begin() as s:
        create_batch(s, task="classify", model="null", inputs=["/in/b.png"])
    assert value(scrape(settings, sessions, app), "pixelmill_jobs", state="queued") == 1
    assert value(first, "pixelmill_jobs", state="queued") == 1
    # Then read afresh: after CACHE_SECONDS, or later when the read was slow (it is kept up to
    # 1 / MAX_SHARE times its duration: on a loaded machine, longer than 2 s).
    deadline = time.monotonic() + metrics.MAX_CACHE_SECONDS + 30
    while value(scrape(settings, sessions, app), "pixelmill_jobs", state="queued") != 2:
        assert time.monotonic() < deadline, "the cached read was never replaced"
        time.sleep(0.2)


# ---- production: Prometheus, Grafana, docker-compose -------------------------------------------

DEPLOY = ROOT / "deploy"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_grafana_dashboard_queries_only_metrics_that_exist(
    tmp_path, redis_server, sessions, uncached
):
    settings = _settings(tmp_path, "sqlite:///unused.db", redis_server.url)
    _populate(sessions)
    with sessions.begin() as s:
        add_totals(s.connection(), [metrics.Total("items", "classify", "null", "cpu", "done", 1)])
    families = scrape(settings, sessions, create_app(settings))
    exported = {s.name for f in families.values() for s in f.samples}
    dashboard = json.loads((DEPLOY / "grafana" / "pixelmill.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(exprs) > 20
    for expr in exprs:
        for name in re.findall(r"\bpixelmill_[a-z_]+", expr):
            assert name in exported, (name, expr)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_prometheus_scrapes_the_dashboard_with_credentials_from_the_environment():
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "pixelmill"]
    assert job["static_configs"][0]["targets"] == ["dashboard:8080"]
    assert job["metrics_path"] == "/metrics"
    assert set(job["basic_auth"]) == {"username_file", "password_file"}  # no secret in the file
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["dashboard"]["command"] == [
        "dashboard", "--address", "0.0.0.0", "--port", "8080",
    ]  # fmt: skip
    auth = services["dashboard"]["environment"]["PIXELMILL_DASHBOARD_BASIC_AUTH"]
    assert auth.startswith("${DASHBOARD_BASIC_AUTH:?")
    assert services["prometheus"]["environment"]["DASHBOARD_BASIC_AUTH"] == auth
    assert (
        "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in (services["prometheus"]["volumes"])
    )
    grafana = services["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?"
    )
    provisioning = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "pixelmill.yml").read_text())
    mounted = f"./deploy/grafana/pixelmill.json:{provider['providers'][0]['options']['path']}/"
    assert any(v.startswith(mounted) for v in grafana["volumes"])
    # `docker-compose config` checks the whole file: tests/test_compose.py


# ---- the worker's report, in process (the GPU parts with stand-ins: no GPU here) ---------------


class _FakeCuda:
    def __init__(self, initialized: bool) -> None:
        self.initialized = initialized

    def is_initialized(self) -> bool:
        return self.initialized

    def memory_allocated(self, device: str) -> int:
        assert device == "cuda:0"
        return 3 << 30

    def get_device_properties(self, device: Any) -> Any:
        return types.SimpleNamespace(
            total_memory=80 << 30, pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0
        )


class _FakeNvml:
    def __init__(self) -> None:
        self.opened: list[str] = []

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByPciBusId(self, bus: str) -> str:
        self.opened.append(bus)
        return "gpu"

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.opened.append(f"index {index}")
        return "gpu"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        return types.SimpleNamespace(gpu=42, memory=10)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_report_names_state_batch_models_items_and_device(sessions, monkeypatch):
    from pixelmill.models.cache import ModelCache
    from pixelmill.worker.batching import WorkerContext
    from pixelmill.worker.heartbeat import Activity, Reporter

    ctx = WorkerContext(
        sessions=sessions, cache=ModelCache("cpu"), device_label="cuda:3", worker_name="w/1"
    )
    ctx.cache.get("classify", "null")
    cuda = _FakeCuda(initialized=False)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    nvml = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    reporter = Reporter(ctx, name="pixelmill-cuda3@h", label="cuda:3", device="cuda:0")
    assert reporter.try_report("starting")
    with sessions() as s:
        (row,) = list_workers(s)
    assert (row.name, row.device, row.state, row.models) == (
        "pixelmill-cuda3@h", "cuda:3", "starting", ("null",),
    )  # fmt: skip
    # CUDA not started yet: no memory figures, and NVML not asked (nor imported torch anew).
    assert (row.memory_used, row.memory_total, row.utilization) == (None, None, None)
    assert nvml.opened == []
    cuda.initialized = True
    now = time.time()
    ctx.activity.finished(5, now=now - 120)
    ctx.activity.finished(7, now=now)
    with ctx.progress.track(["j1", "j2"], "batch-7"):
        assert reporter.try_report("idle")
        with sessions() as s:
            (row,) = list_workers(s)
    assert (row.state, row.batch_id, row.items) == ("busy", "batch-7", 12)
    assert [n for _, n in row.recent] == [5, 7]
    assert (row.memory_used, row.memory_total, row.utilization) == (3 << 30, 80 << 30, 0.42)
    assert nvml.opened == ["00000000:3B:00.0"]  # found by its PCI address, as CUDA sees it
    assert reporter.try_report()
    with sessions() as s:
        assert list_workers(s)[0].state == "idle"
    # Minutes older than the window are dropped.
    old = Activity()
    old.finished(1, now=now - 3600)
    old.finished(2, now=now)
    assert old.snapshot(now)[0] == 3 and [n for _, n in old.snapshot(now)[1]] == [2]


def test_a_report_that_cannot_be_written_is_logged_not_raised(tmp_path, caplog):
    from pixelmill.db.engine import make_engine, make_sessionmaker
    from pixelmill.models.cache import ModelCache
    from pixelmill.worker.batching import WorkerContext
    from pixelmill.worker.heartbeat import Reporter

    engine = make_engine(f"sqlite:///{tmp_path / 'not-migrated.db'}")  # no workers table
    ctx = WorkerContext(sessions=make_sessionmaker(engine), cache=ModelCache("cpu"),
                        device_label="cpu", worker_name="w/1")  # fmt: skip
    try:
        assert not Reporter(ctx, name="n", label="cpu", device="cpu").try_report("starting")
    finally:
        engine.dispose()
    assert "cannot write this worker's report" in caplog.text


def test_no_gpu_utilisation_without_nvml(monkeypatch):
    from pixelmill.worker.heartbeat import GpuUtilization, device_memory

    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=_FakeCuda(True)))
    gpu = GpuUtilization("cuda:0")
    assert gpu.read() is None and gpu.read() is None
    assert device_memory("cpu") == (None, None)
