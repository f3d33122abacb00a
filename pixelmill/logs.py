"""Logging set-up for pixelmill's processes."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    # Alembic narrates every plugin at INFO; only its problems matter here.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # Celery says "Cannot connect to URL: why.\nTrying again in 4.00 seconds... (2/None)\n"
    # on three lines each time: one line, as every other record.
    consumer = logging.getLogger("celery.worker.consumer.consumer")
    if not any(isinstance(f, OneLine) for f in consumer.filters):
        consumer.addFilter(OneLine())


class OneLine(logging.Filter):
    """A record's message on one line (its lines joined with a space); tracebacks untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\n" in message:
            record.msg = " ".join(part.strip() for part in message.splitlines() if part.strip())
            record.args = ()
        return True
