"""The one settings object. Read once per process (``load_settings``) and passed down.

Every variable has the prefix ``PIXELMILL_``. Nothing else in pixelmill reads the environment
for its configuration. Unset service URLs mean "embedded": an embedded Redis on a private unix
socket, SQLite and a local-folder object store, all inside ``PIXELMILL_DATA_DIR``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pixelmill.errors import ConfigError

ENV_PREFIX = "PIXELMILL_"

BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "unix", "socket")
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg")
STORE_SCHEMES = ("file", "s3")


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/pixelmill``, else ``~/.local/share/pixelmill``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pixelmill"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore", frozen=True
    )

    broker_url: str | None = Field(
        default=None, description="Redis broker: redis://, rediss:// or a unix socket URL."
    )
    broker_ca_certs: Path | None = Field(
        default=None,
        description="rediss:// only: the CA file that signs the broker's certificate "
        "(default: the system's CAs). The certificate is always verified.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL: sqlite:///... or postgresql+psycopg://..."
    )
    store_url: str | None = Field(
        default=None,
        description="Object store for artifacts: a local folder (path or file://) or "
        "s3://bucket[/prefix].",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, SeaweedFS...); unset for AWS."
    )
    s3_region: str | None = Field(default=None, description="S3 region.")
    s3_access_key_id: str | None = Field(
        default=None, description="S3 access key; unset: boto3's chain (AWS_* variables, ...)."
    )
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    s3_timeout: float = Field(
        default=30, gt=0, description="Seconds an S3 request may take before it is retried."
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where the embedded default keeps its database, store and broker socket.",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Images per model batch (default per task: classify 32, caption 16, "
        "generate 4).",
    )
    pipeline_depth: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Batches a device worker holds at once: one on the model, the rest decoding.",
    )
    decode_threads: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Image decoding threads per device worker (default: 2 on the CPU; on a GPU, "
        "the host's cores shared among its GPU workers, 2 to 16).",
    )
    decode_memory_mb: int = Field(
        default=2048,
        ge=64,
        le=1 << 20,
        description="MB a device worker's decoding threads may hold together, each image's "
        "share estimated from its header before its pixels are decoded; a decode waits for "
        "its share, and an image that alone needs more is refused.",
    )
    device_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Largest forward pass a worker runs; a message's batch is split into "
        "passes of this size (default: 2 on the CPU, where small batches run fastest; the "
        "whole message on a GPU).",
    )
    top_k: int = Field(default=5, ge=1, le=1000, description="Labels kept per classify result.")
    trust_remote_code: bool = Field(
        default=False,
        description="Let hub models run the Python code they ship (off: only the model "
        "classes of the installed transformers and diffusers load).",
    )
    compile: bool = Field(
        default=False, description="torch.compile the models (classify, generate) in workers."
    )
    model_cache_size: int = Field(
        default=2, ge=1, le=64, description="Models a worker keeps loaded (least recently used go)."
    )
    queue: str = Field(default="pixelmill", min_length=1, description="Celery queue name.")
    lease_seconds: float = Field(
        default=60,
        ge=1,
        description="A running job's lease; its worker renews it every quarter of it. Past it "
        "(the worker died) the reconciler enqueues the job again.",
    )
    window: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Messages each batch keeps on the broker (times its share): the rest of "
        "its jobs wait in the database, and a worker that takes one of its messages sends the "
        "next at once. Enough for the workers that take a message within the same few "
        "milliseconds, whatever the fleet's size (raise it for many fast workers: "
        "`pixelmill bench-queue` shows both sides); each message more is one more a small "
        "batch waits for behind a big one of its priority.",
    )
    queued_lease_seconds: float = Field(
        default=600,
        ge=1,
        description="How long a queued job may wait while the broker's queue is empty before "
        "the reconciler enqueues it again (its message was lost: a wiped Redis).",
    )
    reconcile_interval: float = Field(
        default=15, ge=0.1, description="Seconds between the reconciler's passes."
    )
    service_timeout: float = Field(
        default=300,
        ge=1,
        description="How long `pixelmill run` (and Client.wait) waits for a database or "
        "broker that stopped answering before it gives up (exit 3).",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Starts of a job whose worker died each time before it is failed.",
    )
    visibility_timeout: float = Field(
        default=6 * 3600,
        ge=60,
        description="Redis redelivers an unacknowledged message after this long; longer than "
        "the longest batch (the reconciler recovers dead workers' jobs much sooner).",
    )
    read_timeout: float = Field(
        default=60,
        gt=0,
        description="Seconds a worker gives one input to be read, decoded and preprocessed; "
        "past it (a hung file system) that job fails and its thread is abandoned.",
    )
    stall_seconds: float = Field(
        default=1800,
        gt=0,
        description="A batch that makes no progress (no item decoded, no forward pass, no "
        "artifact stored, no retry) for this long stops renewing its jobs' leases, so the "
        "reconciler takes them back. Longer than the slowest forward pass.",
    )
    transient_retry_seconds: float = Field(
        default=900,
        ge=0,
        description="How long a batch retries a transient error (the database or the object "
        "store away) in place, with backoff up to 60 s, before it fails its jobs with the "
        "real reason. Retries count no attempt.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str | None) -> str | None:
        return _check_scheme(value, BROKER_SCHEMES)

    @field_validator("database_url")
    @classmethod
    def _check_database(cls, value: str | None) -> str | None:
        return _check_scheme(value, DATABASE_SCHEMES)

    @field_validator("store_url")
    @classmethod
    def _check_store(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if "://" not in value:
            return Path(value).expanduser().resolve().as_uri()
        return _check_scheme(value, STORE_SCHEMES)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def to_env(self) -> dict[str, str]:
        """These settings as PIXELMILL_* variables, for the worker processes pixelmill starts."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is not None:
                env[ENV_PREFIX + name.upper()] = str(value)
        return env

    # ---- resolved values -------------------------------------------------------------

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def embedded_socket(self) -> Path:
        """The embedded Redis's unix socket: in the data dir, or (when that path is too long
        for a unix socket) in a private folder under /tmp named after the data dir."""
        sock = self.data_dir.expanduser().resolve() / "redis.sock"
        if len(str(sock)) < 100:
            return sock
        digest = hashlib.sha256(str(sock).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"pixelmill-{digest}" / "redis.sock"

    def resolved_broker_url(self) -> str:
        if self.broker_url is not None:
            return self.broker_url
        return f"redis+socket://{self.embedded_socket}"

    def resolved_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'pixelmill.db'}"

    def resolved_store_url(self) -> str:
        if self.store_url is not None:
            return self.store_url
        return (self.data_dir / "store").resolve().as_uri()


def _check_scheme(value: str | None, schemes: tuple[str, ...]) -> str | None:
    if value is None or value == "":
        return None
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in schemes:
        raise ValueError(
            f"unsupported URL {mask_url(value)!r}; expected one of: "
            + ", ".join(f"{s}://" for s in schemes)
        )
    return encode_userinfo(value)


def load_settings(**overrides: object) -> Settings:
    """Read the environment once; an invalid value raises ConfigError naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "?"
            variable = ENV_PREFIX + field.upper()
            problems.append(f"{variable}: {err['msg']}")
        raise ConfigError("invalid setting — " + "; ".join(problems)) from None


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """``url`` as (``scheme://``, its user[:password], what follows the ``@``), or None when it
    has none. A password may hold anything, raw or percent-encoded, ``#``, ``/``, ``?``, ``@``
    and ``:`` included: the userinfo runs to the last ``@`` of the authority (up to the first
    ``/``, ``?`` or ``#``); when the authority has no ``@`` but ``user:pass`` starts it and an
    ``@`` comes later, the password holds one of ``/?#`` and runs to the URL's last ``@``."""
    sep = url.find("://")
    if sep < 0:
        return None
    start = sep + 3
    end = min([i for i in (url.find(c, start) for c in "/?#") if i >= 0], default=len(url))
    if end == start:  # no authority: sqlite:///path, redis+socket:///path
        return None
    at = url.rfind("@", start, end)
    if at < 0:
        at = url.rfind("@", end)
        if at < 0 or ":" not in url[start:end]:
            return None
    return url[:start], url[start:at], url[at + 1 :]


def _password(url: str) -> str | None:
    split = _userinfo(url)
    if split is None or ":" not in split[1]:
        return None
    return split[1].partition(":")[2]


def encode_userinfo(url: str) -> str:
    """The URL with its user and password percent-encoded (once: what is encoded already stays
    as it is), so that a password with ``#``, ``/``, ``?`` or ``@`` reaches Redis and the
    database intact instead of being read as the URL's fragment, path, query or host."""
    split = _userinfo(url)
    if split is None:
        return url
    head, userinfo, rest = split
    user, colon, password = userinfo.partition(":")
    return f"{head}{_pct(user)}{colon}{_pct(password)}@{rest}"


def _pct(text: str) -> str:
    return quote(unquote(text), safe="")


def mask_url(url: str) -> str:
    """Hide a password in a URL, for logs and output, whatever characters it holds."""
    split = _userinfo(url)
    if split is None:
        return url
    head, userinfo, rest = split
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return url
    return f"{head}{user}:***@{rest}"


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def mask_secrets(text: str, *urls: str | None) -> str:
    """``text`` (an error message, a log line) with the passwords of ``urls`` hidden wherever
    they appear in it (as written, percent-encoded or decoded), and the password of any URL in
    it masked."""
    for url in urls:
        password = _password(url) if url else None
        if not password:
            continue
        plain = unquote(password)
        for form in sorted({password, plain, quote(plain, safe=""), quote(plain)}, key=len)[::-1]:
            if form:
                text = text.replace(form, "***")
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


CPU_DEVICE_BATCH = 2


CPU_DECODE_THREADS = 2
MAX_GPU_DECODE_THREADS = 16


def decode_threads(settings: Settings, device: str, gpu_workers: int = 1) -> int:
    """The decoding threads of a worker on ``device``. A GPU consumes images far faster than
    one core decodes them, so GPU workers share the host's cores (``gpu_workers`` of them on
    this host); a CPU worker's decoding shares its own core with the model."""
    if settings.decode_threads is not None:
        return settings.decode_threads
    if device == "cpu":
        return CPU_DECODE_THREADS
    cores = os.cpu_count() or 1
    return max(CPU_DECODE_THREADS, min(MAX_GPU_DECODE_THREADS, cores // max(1, gpu_workers)))


def device_batch_size(settings: Settings, device: str) -> int | None:
    """The forward-pass size a worker on ``device`` uses (None: the whole message)."""
    if settings.device_batch_size is not None:
        return settings.device_batch_size
    return CPU_DEVICE_BATCH if device == "cpu" else None
