"""`pixelmill bench` end to end on a small workload: the figures it promises, measured for real."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIGURE, MANY_PROCESSES, pixelmill, pixelmill_env

pytestmark = pytest.mark.slow

KEYS = {
    "model_only_ips", "e2e_ips", "naive_ips", "null_ips", "celery_noop_tps",
    "e2e_over_model_only", "e2e_over_naive", "null_over_celery_noop",
    "task", "model", "device", "precision", "batch_size", "forward_batch", "images",
    "image_size", "workers",
}  # fmt: skip


@MANY_PROCESSES
def test_bench_prints_every_measure_as_json_and_as_a_table(tmp_path, record_property):
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    out = pixelmill("bench", "classify", "--images", "24", "--batch-size", "8", "--workers",
                    "2", "--noop-tasks", "200", "--repeat", "1", "--json", env=env,
                    timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    # Printed at the end of the run (tests/conftest.py): pixelmill's own path against plain
    # Celery on the same broker and workers, and the null model's two-worker scaling.
    for key in ("null_over_celery_noop", "null_scaling", "null_ips", "celery_noop_tps"):
        record_property(f"{FIGURE}bench classify (24 images, 2 CPU workers) {key}", figures[key])
    assert KEYS | {"null_ips_one_worker", "null_scaling"} <= set(figures)
    assert (figures["task"], figures["model"], figures["device"]) == (
        "classify", "efficientnet_lite0", "cpu"
    )  # fmt: skip
    assert (figures["workers"], figures["batch_size"], figures["precision"]) == (2, 8, "fp32")
    assert all(len(runs) == 1 for runs in figures["runs"].values())
    for key in ("model_only_ips", "e2e_ips", "naive_ips", "null_ips", "celery_noop_tps"):
        assert figures[key] > 0
    # The null model does no work: it must beat the real model end to end.
    assert figures["null_ips"] > figures["e2e_ips"]
    assert figures["e2e_over_model_only"] == pytest.approx(
        figures["e2e_ips"] / figures["model_only_ips"], rel=0.02
    )
    # A bench leaves nothing behind in the configured data dir.
    assert not (tmp_path / "data" / "pixelmill.db").exists()

    table = pixelmill("bench", "classify", "--model", "null", "--images", "8",
                      "--noop-tasks", "50", "--workers", "1", "--repeat", "2", env=env,
                      timeout=600)  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "end to end / model only" in table.stdout and "null" in table.stdout


@MANY_PROCESSES
def test_bench_queue_shows_the_broker_flat_and_a_small_batch_not_stuck(tmp_path, record_property):
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    proc = pixelmill("bench-queue", "--jobs", "128,20000", "--small", "16", "--big", "4000",
                     "--batch-size", "8", "--workers", "2", "--json", env=env,
                     timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout)
    small, large = figures["sizes"]
    # The window (2 messages of 8) whatever the batch's size; every queued job cancelled.
    assert (small["messages"], large["messages"]) == (2, 2)
    assert (small["cancelled"], large["cancelled"]) == (128, 20000)
    fair = figures["fair_share"]
    assert fair["small_alone_s"] > 0 and fair["small_behind_big_s"] > 0
    for key in ("redis_bytes", "jobs_per_s", "cancel_s"):
        record_property(f"{FIGURE}bench-queue {key} at 128 / 20,000 jobs",
                        f"{small[key]} / {large[key]}")  # fmt: skip
    record_property(f"{FIGURE}bench-queue 16 jobs behind 4,000 / alone (2 workers)",
                    fair["behind_over_alone"])  # fmt: skip
    table = pixelmill("bench-queue", "--jobs", "64", "--big", "0", env=env, timeout=600)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "window 2 messages of 32 jobs" in table.stdout and "64" in table.stdout


def test_bench_search_fills_and_times_a_search(tmp_path):
    """`pixelmill bench-search` on a small table: it fills, searches and prints its figures."""
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    out = pixelmill("bench-search", "--rows", "3000", "--dim", "16", "--queries", "2", env=env)
    assert out.returncode == 0, out.stderr
    assert "sqlite, 3,000 embeddings x 16-d, vectorised scan" in out.stdout, out.stdout
    for line in ("fill", "first query", "median query", "slowest query"):
        assert line in out.stdout


def test_bench_refuses_bad_labels_before_starting(tmp_path):
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    out = pixelmill("bench", "classify", "--labels", "a,a", "--images", "4", env=env, timeout=60)
    assert out.returncode == 2 and "given twice" in out.stderr, out.stderr
