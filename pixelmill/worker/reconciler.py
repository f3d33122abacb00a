"""The reconciler: brings back work that nothing will otherwise finish.

- A running job whose lease ran out: its worker died (SIGKILL, OOM kill, a lost host) without
  finishing or releasing it; live workers renew their jobs' leases every quarter lease. Its
  ids are enqueued again (the original message, unacknowledged, would only come back after
  Redis's visibility timeout, hours later). One job per message: any of them may be what
  killed the worker.
- The broker lost its data (Redis restarted without persistence, flushed, replaced: the
  epoch pixelmill keeps in it, ``pixelmill.wire.broker_epoch``, changed): every queued job's
  message is gone. Each is enqueued again at the next pass, by one reconciler of the fleet
  (``claim_recovery``), whatever its lease.
- A queued job whose lease ran out while the broker's queue is empty: its message is gone (a
  producer killed between commit and enqueue, a loss that happened while no reconciler was
  watching). Enqueued again.
- A batch whose window went quiet while the queue is busy with others (every job with a
  message leased out, none taken since): its window is sent again (``db.window.stalled``);
  so is the window of a batch left with a backlog and no message at all.

Each pass also folds the job tallies that PostgreSQL's triggers add, one row per statement,
into one row per batch and state (``pixelmill.db.tallies.fold``), so reading a batch's counts
stays a few rows.

Taking a stranded job renews its lease in the same UPDATE, so reconcilers on several hosts
never enqueue one job twice at once; a duplicate message is harmless anyway (a claim skips
finished jobs). A job whose worker keeps dying is failed by the claim after
PIXELMILL_MAX_ATTEMPTS starts.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from pixelmill.db.jobs import take_stranded
from pixelmill.db.schema import JobStatus, utcnow
from pixelmill.db.tallies import fold
from pixelmill.db.window import stalled
from pixelmill.settings import Settings, mask_url
from pixelmill.wire import broker_epoch, claim_recovery, enqueue, message_size, queue_length

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], app: Any) -> None:
        self.settings = settings
        self.sessions = sessions
        self.app = app
        self.requeued = 0
        self._next = 0.0
        self._epoch: str | None = None  # the broker's epoch at the last pass

    def maybe_run(self) -> int:
        """``run_once`` if ``reconcile_interval`` has passed since the last pass."""
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + self.settings.reconcile_interval
        try:
            return self.run_once()
        except Exception as exc:  # noqa: BLE001 - the database or broker away: try again next pass
            away = self.service_away(exc)
            if away is None:  # not a service away: a bug, with its traceback
                log.warning("reconciler pass failed; retrying later", exc_info=True)
            else:  # one line a pass: which service, where, and when the next try is
                log.warning(
                    "reconciler: %s; next pass in %gs", away, self.settings.reconcile_interval
                )
            return 0

    def service_away(self, exc: BaseException) -> str | None:
        """ "the broker redis://:***@host:6379/0 cannot be reached (Error 111 …)" when ``exc``
        says a service is away (the database or the broker: unreachable, refusing, timing
        out), else None."""
        from kombu.exceptions import OperationalError as BrokerError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeout

        if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
            why = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            where = mask_url(self.settings.resolved_database_url())
            return f"the database {where} cannot be reached ({why[0] if why else exc})"
        if isinstance(exc, BrokerError | RedisConnectionError | RedisTimeout | OSError):
            why = str(exc).strip().splitlines()
            where = mask_url(self.settings.resolved_broker_url())
            return f"the broker {where} cannot be reached ({why[0] if why else type(exc).__name__})"
        return None

    def run_once(self) -> int:
        count = self._requeue(JobStatus.running, self.settings.lease_seconds)
        if self._broker_lost():
            log.warning(
                "reconciler: the broker lost its data (restarted without persistence, flushed "
                "or replaced): every queued job is enqueued again"
            )
            count += self._requeue_all_queued()
        elif queue_length(self.app, self.settings.queue) == 0:
            count += self._requeue(JobStatus.queued, self.settings.queued_lease_seconds)
        count += self._send_stalled()
        with self.sessions.begin() as session:
            fold(session)
        return count

    def _send_stalled(self) -> int:
        """Send again the windows of batches gone quiet (``pixelmill.db.window.stalled``):
        their messages were lost while other batches keep the queue from emptying."""
        with self.sessions.begin() as session:
            windows = stalled(session, window=self.settings.window,
                              lease=self.settings.queued_lease_seconds)  # fmt: skip
        for sent in windows:
            enqueue(self.app, sent.job_ids, sent.size, sent.priority)
            log.warning(
                "reconciler: batch %s had no message taken for %gs; its window of %d job(s) "
                "sent again", sent.batch_id, self.settings.queued_lease_seconds, len(sent.job_ids),
            )  # fmt: skip
        self.requeued += sum(len(w.job_ids) for w in windows)
        return sum(len(w.job_ids) for w in windows)

    def _broker_lost(self) -> bool:
        """Whether the broker's epoch changed since the last pass, and this reconciler is the
        one to enqueue again what it lost. The first pass only learns the epoch."""
        epoch = broker_epoch(self.app)
        before, self._epoch = self._epoch, epoch
        return before is not None and before != epoch and claim_recovery(self.app, epoch)

    def _requeue_all_queued(self) -> int:
        """Every queued job, a chunk at a time: those whose lease ends before the one this
        pass gives (none it took already, all the others)."""
        lease = self.settings.queued_lease_seconds
        after = utcnow() + timedelta(seconds=lease)
        count = 0
        while taken := self._requeue(JobStatus.queued, lease, expired_before=after):
            count += taken
        return count

    def _requeue(
        self, status: JobStatus, lease: float, *, expired_before: datetime | None = None
    ) -> int:
        with self.sessions.begin() as session:
            stranded = take_stranded(session, status=status, lease=lease,
                                     expired_before=expired_before)  # fmt: skip
        count = 0
        for group in stranded:
            # A running job whose worker died may be what killed it: each goes alone, so the
            # jobs that shared its batch finish and only a job that kills every worker
            # accumulates attempts (and fails at PIXELMILL_MAX_ATTEMPTS).
            size = 1 if status == JobStatus.running else message_size(group.message_size)
            enqueue(self.app, group.job_ids, size, group.priority)
            count += len(group.job_ids)
            log.warning(
                "reconciler: %d %s job(s) of batch %s had no live holder; enqueued again",
                len(group.job_ids), status.value, group.batch_id,
            )  # fmt: skip
        self.requeued += count
        return count
