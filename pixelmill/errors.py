"""The error tree. A user-facing error names the input and says what to do."""

from __future__ import annotations


class PixelmillError(Exception):
    """Base of every error pixelmill raises on purpose."""


class ConfigError(PixelmillError):
    """A setting is invalid; the message names the environment variable."""


class BadInput(PixelmillError):
    """One input cannot be processed (corrupt, truncated, not an image...). Fails one job."""


class ModelUnavailable(PixelmillError):
    """A model cannot be resolved or loaded. Fails the jobs that name it."""


class InputError(PixelmillError):
    """An input argument that names nothing usable (a usage error, not a failed job)."""


class ServiceUnavailable(PixelmillError):
    """A service (broker, database, store) cannot be reached."""


class StoreError(ServiceUnavailable):
    """The object store failed a read or a write (unreachable, timed out, refused, missing
    object). The worker retries it in place while ``transient`` (the store away or failing for
    a moment: a connection refused, a timeout, a 5xx), and not when it cannot help (a missing
    object, access denied); a command exits 3 on it, as for any service."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class UnknownBatch(PixelmillError):
    """A batch id that the database does not know."""
