"""`pixelmill run`: submit, start local workers, wait with a progress display, print the
results and stop what it started. A command of the top layer: it is the one place where the
producer and the worker meet."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from pixelmill.cli.batches import DOWNLOAD, download_artifacts, jobs_exit_status, print_results
from pixelmill.cli.common import (
    EXIT_OK,
    EXIT_SERVICE,
    EXIT_TIMEOUT,
    fail,
    open_client,
    settings_or_exit,
    user_errors,
)
from pixelmill.cli.submit import describe, print_plan, submission, submit_options
from pixelmill.db.records import BatchCounts
from pixelmill.producer.output import Progress, elapsed
from pixelmill.stopping import stop_signals_raise

if TYPE_CHECKING:
    from pixelmill.producer.client import Client, Submission


@click.command()
@submit_options
@click.option(
    "--devices",
    default="auto",
    show_default=True,
    help="Local workers: auto (every GPU, else the CPU), cpu, or GPU indices like 0,1.",
)
@click.option(
    "--local-workers/--no-local-workers",
    default=True,
    show_default=True,
    help="Start workers on this host for the run (turn off when a worker fleet serves the "
    "configured broker).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop waiting after this many seconds: print the results so far and exit 4 (the "
    "unfinished jobs stay queued).",
)
@DOWNLOAD
@click.option(
    "--dashboard",
    is_flag=True,
    help="Serve the dashboard on 127.0.0.1 while the run lasts (its URL on stderr).",
)
@click.option(
    "--dashboard-port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="--dashboard's port (0: any free one).",
)
def run(
    task: str,
    inputs: tuple[str, ...],
    model: str | None,
    as_json: bool,
    name: str | None,
    batch_size: int | None,
    again: bool,
    force: bool,
    plan_only: bool,
    upload: bool,
    devices: str,
    local_workers: bool,
    timeout: float | None,
    download: str | None,
    dashboard: bool,
    dashboard_port: int,
    **task_options: Any,
) -> None:
    """Submit, process and print, all in one.

    Uses the configured services; with none configured it starts the embedded ones (Redis on
    a private socket, SQLite and a local-folder store in PIXELMILL_DATA_DIR) and one worker per
    device, waits with a progress display, prints one line per job and stops what it started.

    INPUT is an image file, a folder (searched recursively for images) or - (paths on stdin).
    generate takes --prompt instead, and --init INPUT for image-to-image.

    classify and caption are incremental: an image whose bytes were processed before with the
    same model (revision) and options is done at once with that result (marked reused), so a
    nightly run over a growing archive only processes what is new or changed. --plan says
    what a run would do without doing it; --force processes everything again. A second run
    over the same INPUTs while one is in progress waits for it, then does what is left.

    \b
    Examples:
      pixelmill run classify photos/ --json > labels.jsonl
      pixelmill run caption photos/ --num-beams 3
      pixelmill run generate --prompt "a lighthouse at dusk" --count 4 --seed 7
      pixelmill run generate --prompt "as a watercolor" --init photos/ --strength 0.6
    """
    # The worker side (Redis, the device processes) and the dashboard, when run runs.
    from pixelmill.dashboard.serving import served_dashboard
    from pixelmill.worker.devices import parse_devices
    from pixelmill.worker.local import embedded_broker
    from pixelmill.worker.local import local_workers as local_workers_for

    settings = settings_or_exit()
    started = time.monotonic()
    with user_errors(), stop_signals_raise() as stops:
        args = submission(task, inputs, task_options)
        if plan_only:
            with open_client(settings, create=True) as client:
                print_plan(client, task, model, args, force, as_json)
            sys.exit(EXIT_OK)
        log_dir = settings.data_dir / "logs"
        specs = None if devices.strip().lower() == "auto" else parse_devices(devices)
        with (
            embedded_broker(settings) as broker,
            open_client(settings, create=True) as client,
            served_dashboard(settings, dashboard, dashboard_port),
        ):

            def submit() -> Submission:
                return client.submit(task, model=model, name=name, batch_size=batch_size,
                                     again=again, force=force, upload=upload,
                                     **args)  # fmt: skip

            sub = submit()
            # Local workers only when there is work: a nightly re-run that finds everything
            # done costs a scan, not a worker start-up.
            needed = local_workers and not client.status(sub.batch_id).complete
            workers = (
                local_workers_for(settings, specs or devices, log_dir=log_dir, broker=broker)
                if needed
                else contextlib.nullcontext(None)
            )
            with workers as supervisor:
                deadline = None if timeout is None else time.monotonic() + timeout

                def wait(sub: Submission) -> bool:
                    """True once the batch is finished; False when --timeout came first."""
                    check = _supervising(supervisor, settings, sub.batch_id, log_dir)
                    try:
                        _wait(client, sub, deadline, check)
                    except TimeoutError:
                        return False
                    return True

                sub, timed_out = _wait_for_batches(sub, submit, wait)
                with stops.deferred():  # a stop waits (briefly) for the results to be printed
                    done, failed, cancelled = print_results(client, sub.batch_id, as_json)
                if download:
                    download_artifacts(client, sub.batch_id, download)
        if timed_out:
            unfinished = sub.jobs - done - failed - cancelled
            fail(
                f"timed out after {timeout:g}s: {done} done, {failed} failed, {unfinished} not "
                f"finished; batch {sub.batch_id} stays queued for any worker on this broker "
                f"(`pixelmill status {sub.batch_id}`)",
                EXIT_TIMEOUT,
            )
        _closing_lines(client, sub, (done, failed, cancelled), time.monotonic() - started)
    sys.exit(jobs_exit_status(failed, cancelled))


def _wait_for_batches(
    sub: Submission, submit: Callable[[], Submission], wait: Callable[[Submission], bool]
) -> tuple[Submission, bool]:
    """Wait for the batch; when the submit found another run's batch over the same inputs
    still in progress, wait for that one first, then submit again for what is left (new and
    changed since that run began). The batch waited for last, and whether --timeout came
    first. The batch id goes to stderr, so also with --json."""
    if sub.attached:
        click.echo(f"batch {sub.batch_id}: {describe(sub)}; waiting for it", err=True)
        if not wait(sub):
            return sub, True
        sub = submit()
    if not sub.attached:
        click.echo(f"batch {sub.batch_id}: {describe(sub)}", err=True)
    return sub, not wait(sub)


def _closing_lines(
    client: Client, sub: Submission, ended: tuple[int, int, int], seconds: float
) -> None:
    """On stderr, also with --json: how it went and how fast, and whether someone cancelled
    the batch (`pixelmill cancel`)."""
    done, failed, cancelled = ended
    if sub.existing:  # this exact submit was made before: its jobs were all done then
        reused, processed = done, 0
    else:
        reused, processed = sub.reused, done + failed - sub.reused
    pace = client.status(sub.batch_id) if processed > 0 else None
    click.echo(summary(done, failed, reused, seconds, processed, pace), err=True)
    if cancelled:
        click.echo(f"batch {sub.batch_id} was cancelled: {cancelled} job(s) cancelled", err=True)


def summary(
    done: int,
    failed: int,
    reused: int,
    seconds: float,
    processed: int = 0,
    pace: BatchCounts | None = None,
) -> str:
    """The last line of a run: "12 done (4 reused), 1 failed in 9.4s (2.9 images/s)". The time
    is the run's whole wall time (start-up and model loading included, as a script timing it
    would see); the rate is the workers': the ``processed`` images (not those reused) over the
    time from the first one a worker started to the last one it finished (``pace``). A run
    that processed nothing shows no rate."""
    text = f"{done} done" + (f" ({reused} reused)" if reused else "") + f", {failed} failed"
    text += f" in {elapsed(seconds)}"
    if processed > 0 and pace is not None and pace.started_at and pace.last_finished_at:
        span = (pace.last_finished_at - pace.started_at).total_seconds()
        if span > 0:
            text += f" ({processed / span:.1f} images/s)"
    return text


def _wait(
    client: Client, sub: Submission, deadline: float | None, check: Callable[[], None]
) -> None:
    """Wait for ``sub``'s batch with a progress display; TimeoutError past ``deadline``."""
    timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
    with Progress(sub.jobs) as progress:
        client.wait(sub.batch_id, timeout=timeout, on_progress=progress.update, check=check)


def _supervising(supervisor: Any, settings: Any, batch_id: str, log_dir: Any) -> Callable[[], None]:
    """What `run` checks while it waits: its local workers restarted when they crash (a job
    that keeps killing them fails after PIXELMILL_MAX_ATTEMPTS, the rest go on), the embedded
    broker brought back if it vanished; it gives up (exit 3) only when the workers cannot start
    at all or the broker stays away for PIXELMILL_SERVICE_TIMEOUT."""

    def check() -> None:
        if supervisor is None:
            return
        supervisor.poll()
        why = supervisor.failing_to_start
        if why is not None:
            fail(f"{why} (batch {batch_id} stays in the database)", EXIT_SERVICE)
        since = supervisor.broker_down_since
        if since is not None and time.monotonic() - since > settings.service_timeout:
            fail(
                f"the embedded broker has not answered for {settings.service_timeout:g}s "
                f"(see {settings.data_dir / 'redis.log'}); batch {batch_id} stays in the "
                "database",
                EXIT_SERVICE,
            )

    return check
