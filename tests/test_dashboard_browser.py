"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright, against a
real `pixelmill worker` and a real `pixelmill dashboard` process. The page loads, a running
batch's progress advances without a reload, pause / resume / cancel change the job states in
the database, the failure list shows a bad file's reason, and a hostile file name stays text.
Screenshots go to the test's tmp folder (their paths are printed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pixelmill.producer.client import Client
from pixelmill.settings import Settings
from tests.conftest import ROOT, pixelmill_env, skimage_data
from tests.services import free_port

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]  # fmt: skip
HOSTILE = "<script>alert(1)</script>.jpg"  # a folder "<script>alert(1)<" holding "script>.jpg"
BATCH_NAME = "<script>alert('batch')</script> nightly"


def chromium_or_skip() -> str:
    path = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if path is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup test installs it as root)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    return path


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.2)


def make_images(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        shade = (i * 37 % 255, i * 91 % 255, i * 13 % 255)
        Image.new("RGB", (96, 72), shade).save(folder / f"img{i:05d}.jpg", quality=80)


@pytest.fixture
def dashboard_process(tmp_path: Path, redis_server: Any) -> Iterator[tuple[str, dict[str, str]]]:
    env = pixelmill_env(data_dir=str(tmp_path / "data"), broker_url=redis_server.url,
                        queue="browser-" + tmp_path.name[-16:])  # fmt: skip
    port = free_port()
    log = (tmp_path / "dashboard.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixelmill", "dashboard", f"--port={port}"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        try:
            with urllib.request.urlopen(url + "api/batches", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return proc.poll() is not None  # died: stop waiting, the assert below says so

    try:
        wait_for(up, 60, "the dashboard to answer")
        assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
        yield url, env
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_the_page_live_with_a_worker(tmp_path, dashboard_process, start_worker, bad_files):
    chromium = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    url, env = dashboard_process
    settings = Settings(
        data_dir=Path(env["PIXELMILL_DATA_DIR"]),
        broker_url=env["PIXELMILL_BROKER_URL"],
        queue=env["PIXELMILL_QUEUE"],
    )
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(skimage_data() / name, mixed / name)
    (mixed / HOSTILE).parent.mkdir()
    shutil.copy(skimage_data() / "rocket.jpg", mixed / HOSTILE)
    shutil.copy(bad_files["text"], mixed / "notes.jpg")
    make_images(tmp_path / "many", 2500)
    shots: list[Path] = []

    with Client(settings) as client, sync_playwright() as p:
        small = client.submit("classify", [str(mixed)], name=BATCH_NAME, priority="high")
        big = client.submit("classify", [str(tmp_path / "many")], name="big archive",
                            batch_size=8)  # fmt: skip
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def shot(name: str) -> None:
            path = tmp_path / f"dashboard-{name}.png"
            page.screenshot(path=str(path))
            shots.append(path)
            print(f"screenshot: {path}")

        page.goto(url)
        rows = page.locator("#batches tbody tr")
        expect(rows).to_have_count(2, timeout=20_000)
        expect(page.locator("#live")).to_contain_text("live", timeout=10_000)
        # the hostile batch name is text, never markup
        expect(page.locator("#batches")).to_contain_text(BATCH_NAME)
        start_worker(env)

        # a running batch's progress advances without a reload
        big_row = page.locator(f'#batches tr[data-batch="{big.batch_id}"] .count')

        def finished_shown() -> int:
            return int(big_row.inner_text().split("/")[0].strip())

        first = wait_for(finished_shown, 180, "the big batch to start")
        wait_for(lambda: finished_shown() > first + 16, 60, "the progress bar to advance")
        shot("running")

        # the failure list shows the bad file's reason; the hostile name stays text
        client.wait(small.batch_id, timeout=120)
        page.goto(url + f"#/batch/{small.batch_id}")
        group = client.failures(small.batch_id).groups[0]
        failures = page.locator("#failures")
        expect(failures).to_contain_text("notes.jpg", timeout=10_000)
        expect(failures).to_contain_text(group.kind)  # the kind, then each input with its detail
        expect(failures).to_contain_text(group.examples[0].detail)
        sheet = page.locator("#sheet")
        expect(sheet.locator("figure")).to_have_count(4, timeout=10_000)
        hostile = page.get_by_text(str(mixed / HOSTILE), exact=True)
        expect(hostile).to_be_visible()
        assert page.locator("#sheet script").count() == 0
        shot("failures")

        # pause: no queued job of the batch starts; resume: it carries on; cancel: the
        # queued jobs end cancelled
        page.goto(url + f"#/batch/{big.batch_id}")
        expect(page.locator("#batch-title")).to_have_text("big archive", timeout=10_000)
        page.locator('[data-action="pause"]').click()
        expect(page.locator("#batch-counts")).to_contain_text("paused", timeout=10_000)
        assert client.status(big.batch_id).paused
        wait_for(lambda: not client.status(big.batch_id).by_status.get("running"), 60,
                 "the running jobs to finish")  # fmt: skip
        held = client.status(big.batch_id).by_status
        time.sleep(3)
        assert client.status(big.batch_id).by_status == held  # nothing started while paused
        assert held.get("queued", 0) > 0
        shot("paused")

        page.locator('[data-action="resume"]').click()
        expect(page.locator("#batch-counts")).not_to_contain_text("paused", timeout=10_000)
        assert not client.status(big.batch_id).paused
        wait_for(lambda: client.status(big.batch_id).by_status.get("done", 0)
                 > held.get("done", 0), 60, "work to resume")  # fmt: skip

        cancel = page.locator('[data-action="cancel"]')
        cancel.click()
        expect(cancel).to_have_text("Confirm cancel")
        cancel.click()
        expect(page.locator("#batch-counts")).to_contain_text("cancelled", timeout=10_000)
        wait_for(lambda: not client.status(big.batch_id).by_status.get("running"), 60,
                 "the running jobs to finish")  # fmt: skip
        final = client.status(big.batch_id)
        assert final.cancelled and final.by_status.get("cancelled", 0) > 0
        assert final.by_status.get("queued", 0) == 0
        assert final.by_status.get("done", 0) + final.by_status["cancelled"] == 2500
        shot("cancelled")

        # The jobs of one state, a page on and back again (by cursor: the jobs' places)
        assert final.by_status["cancelled"] > 96
        page.select_option("#job-status", "cancelled")
        label, first_card = page.locator("#page"), page.locator("#sheet figure").first
        expect(label).to_have_text("1–48", timeout=10_000)
        expect(first_card).to_contain_text("cancelled", timeout=10_000)
        first = first_card.get_attribute("data-job")
        page.locator("#next").click()
        expect(label).to_have_text("49–96", timeout=10_000)
        expect(first_card).not_to_have_attribute("data-job", first or "", timeout=10_000)
        expect(first_card).to_contain_text("cancelled")
        page.locator("#prev").click()
        expect(label).to_have_text("1–48", timeout=10_000)
        expect(first_card).to_have_attribute("data-job", first or "", timeout=10_000)

        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        page.goto(url)
        expect(rows).to_have_count(2, timeout=10_000)
        wide = page.evaluate("[document.documentElement, ...document.querySelectorAll('.scroll')]"
                             ".filter(e => e.scrollWidth > e.clientWidth + 1).length")  # fmt: skip
        assert wide == 0, "a table does not fit a 390 px phone"
        expect(page.locator("#batches .bar").first).to_be_visible()
        shot("phone")
        page.goto(url + f"#/batch/{small.batch_id}")
        expect(page.locator("#failures")).to_contain_text("notes.jpg", timeout=10_000)
        shot("phone-batch")
        browser.close()

    assert dialogs == [], dialogs  # no script from a name ever ran
    assert errors == [], errors
    assert all(p.stat().st_size > 10_000 for p in shots)
