"""`pixelmill bench TASK --with-dashboard`: what watching costs the workers. End to end is measured
plain and "observed" -- `pixelmill dashboard` serving in its own process, its page open in
headless chromium (polling the API every 2 s, the batch's own view open: fleet, batches,
counts, throughput, failures and the contact sheet's thumbnails) and ``/metrics`` scraped
every second -- in alternating order (plain, observed, observed, plain, ...) on the same
workers, and the ratio observed / plain printed (the issue's target: at least 0.97)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pixelmill.errors import InputError

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]  # fmt: skip
SCRAPE_SECONDS = 1.0


def chromium_path() -> str:
    """Debian's chromium (Playwright's own browser download is never used)."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium")
                                        else None)  # fmt: skip
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        raise InputError(
            "--with-dashboard needs chromium and playwright (`scripts/setup test` installs "
            "both: Debian's chromium via apt-get, playwright from PyPI)"
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ticks() -> dict[int, tuple[int, str, float]]:
    """Every process: pid -> (parent pid, name, CPU seconds used so far)."""
    hz = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(entry)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / hz)
    return found


def cpu_seconds(root: int, dashboard: int) -> dict[str, float]:
    """CPU seconds used so far by the dashboard process and by the chromium processes that
    descend from ``root`` (this process: Playwright's driver starts them)."""
    procs = _ticks()

    def descends(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == root:
                return True
            pid = procs.get(pid, (0, "", 0.0))[0]
            seen += 1
        return False

    chromium = sum(t for pid, (_, name, t) in procs.items()
                   if "chrom" in name and descends(pid))  # fmt: skip
    return {"dashboard": procs.get(dashboard, (0, "", 0.0))[2], "chromium": chromium}


class Observer:
    """What ``observed`` yields: ``show(batch_id)`` opens that batch's view in the page;
    ``cpu()`` the CPU seconds the dashboard and chromium have used so far."""

    def __init__(self, show: Callable[[str], None], dashboard_pid: int) -> None:
        self.show = show
        self.pid = dashboard_pid

    def cpu(self) -> dict[str, float]:
        return cpu_seconds(os.getpid(), self.pid)


@contextlib.contextmanager
def observed(env: dict[str, str], log: Path) -> Iterator[Observer]:
    """`pixelmill dashboard` in its own process on ``env``'s services, its page open in
    headless chromium and /metrics scraped every second, for as long as the block runs."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pixelmill", "dashboard", f"--port={port}"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    stop = threading.Event()
    scrapes = {"ok": 0, "failed": 0}

    def scrape() -> None:
        while not stop.wait(SCRAPE_SECONDS):
            try:
                with urllib.request.urlopen(url + "metrics", timeout=10) as resp:
                    resp.read()
                scrapes["ok"] += 1
            except OSError:
                scrapes["failed"] += 1

    scraper = threading.Thread(target=scrape, name="scrape", daemon=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "api/batches", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the dashboard did not start (see {log})") from None
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.wait_for_selector("#live.ok")
            scraper.start()

            def show(batch_id: str) -> None:
                page.goto(url + f"#/batch/{batch_id}")

            try:
                yield Observer(show, proc.pid)
            finally:
                stop.set()
                browser.close()
    finally:
        stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def compare(
    bench: Any, client: Any, env: dict[str, str], say: Callable[[str], None]
) -> dict[str, Any]:
    """End to end plain and observed, ``bench.cfg.repeat`` times each in ABBA order; the
    medians and their ratio."""
    import statistics

    cfg = bench.cfg
    chromium_path()  # fail before measuring anything
    runs: dict[str, list[float]] = {"e2e_ips": [], "e2e_observed_ips": []}
    used: dict[str, list[float]] = {"dashboard": [], "chromium": []}
    for round_ in range(cfg.repeat):
        order = ("plain", "observed") if round_ % 2 == 0 else ("observed", "plain")
        for kind in order:
            say(f"end to end, {kind} ({round_ + 1}/{cfg.repeat})")
            if kind == "plain":
                ips = bench.timed(client, cfg.images, model=cfg.model_name, batch_size=cfg.size)
                runs["e2e_ips"].append(ips)
                continue
            with observed(env, bench.work / "dashboard.log") as watch:
                before = watch.cpu()
                ips = bench.timed(client, cfg.images, model=cfg.model_name,
                                  batch_size=cfg.size, on_submit=watch.show)  # fmt: skip
                after = watch.cpu()
            runs["e2e_observed_ips"].append(ips)
            seconds = cfg.images / ips
            for key in used:  # share of one core while measured
                used[key].append((after[key] - before[key]) / seconds)
    plain = statistics.median(runs["e2e_ips"])
    seen = statistics.median(runs["e2e_observed_ips"])
    return {
        "e2e_ips": round(plain, 2),
        "e2e_observed_ips": round(seen, 2),
        "observed_over_plain": round(seen / plain, 3),
        "dashboard_cpu_share": round(statistics.median(used["dashboard"]), 3),
        "chromium_cpu_share": round(statistics.median(used["chromium"]), 3),
        "runs": {k: [round(v, 2) for v in vs] for k, vs in runs.items()},
    }
