"""Inputs in object storage: ``s3://bucket/prefix/`` listed (with pagination) by the producer
and each object fetched by a worker, on any S3-compatible endpoint. They use the same S3
settings as the store (``PIXELMILL_S3_ENDPOINT_URL``, ``PIXELMILL_S3_ACCESS_KEY_ID``...; without
keys, boto3's own credential chain).

A listing that fails (no such bucket, bad credentials, the endpoint down) is a
``ServiceUnavailable`` naming the URI, raised before anything is registered. A fetch that fails
(the object deleted since it was listed, access denied on that key) is a ``BadInput`` naming
the URI: that job fails, the others go on."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from pixelmill.db.store import error_code, s3_client, s3_settings, s3_transient
from pixelmill.errors import BadInput, InputError, ServiceUnavailable, StoreError

if TYPE_CHECKING:
    from pixelmill.settings import Settings

S3 = "s3://"
PAGE = 1000  # keys per listing request (S3's maximum)


class ObjectUnavailable(ServiceUnavailable):
    """One object named exactly cannot be looked up (access denied on that key): as an
    argument, the listing failed (exit 3); read from stdin, that job fails on its own."""


def is_remote(name: str) -> bool:
    return name.startswith(S3)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key"); InputError if it names no bucket."""
    rest = uri[len(S3) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(f"{uri}: names no bucket (s3://bucket/prefix/)")
    return bucket, key


@dataclass(frozen=True)
class RemoteObject:
    """An object as listed: its URI, size, ETag and modification time (ns since the epoch)."""

    uri: str
    size: int
    etag: str
    modified_ns: int


@dataclass(frozen=True)
class FetchedObject:
    uri: str
    data: bytes
    etag: str


class S3Inputs:
    """Lists and fetches s3:// inputs. One client, shared by threads (boto3 clients are)."""

    def __init__(self, settings: Settings | None = None, *, client: Any = None) -> None:
        self.client = client if client is not None else s3_client(**s3_settings(settings))

    def list(self, uri: str, extensions: Collection[str]) -> Iterator[RemoteObject]:
        """The objects under ``uri``, in key order: every key under a prefix whose extension is
        in ``extensions`` (hidden names and folder markers skipped), or the one object ``uri``
        names exactly (any extension, as a file named on the command line)."""
        bucket, key = split_uri(uri)
        exact = bool(key) and not key.endswith("/")
        if exact:
            head = self._head(bucket, key, uri)
            if head is not None:
                yield head
                return
            key += "/"  # a "folder" typed without its slash
        found = False
        for obj in self._listing(uri, bucket, key, extensions):
            found = True
            yield obj
        if exact and not found:
            raise InputError(f"{uri}: no such object (nor a prefix holding images)")

    def _listing(
        self, uri: str, bucket: str, key: str, extensions: Collection[str]
    ) -> Iterator[RemoteObject]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(
                Bucket=bucket, Prefix=key, PaginationConfig={"PageSize": PAGE}
            ):
                for obj in page.get("Contents", []):
                    name = obj["Key"]
                    base = PurePosixPath(name).name
                    if name.endswith("/") or base.startswith("."):
                        continue
                    if PurePosixPath(base).suffix.lower() not in extensions:
                        continue
                    yield _listed(f"{S3}{bucket}/{name}", obj)
        except (BadInput, InputError):
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's many kinds
            raise ServiceUnavailable(f"cannot list {uri}: {_why(exc)}") from None

    def _head(self, bucket: str, key: str, uri: str) -> RemoteObject | None:
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            code = error_code(exc)
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            if code in ("403", "AccessDenied"):
                raise ObjectUnavailable(f"cannot list {uri}: {_why(exc)}") from None
            raise ServiceUnavailable(f"cannot list {uri}: {_why(exc)}") from None
        return RemoteObject(
            uri=uri,
            size=int(head["ContentLength"]),
            etag=str(head.get("ETag", "")).strip('"'),
            modified_ns=_ns(head.get("LastModified")),
        )

    def fetch(self, uri: str, *, max_bytes: int | None = None) -> FetchedObject:
        """The object's bytes; BadInput naming ``uri`` if it cannot be had (gone, access
        denied, larger than ``max_bytes``); StoreError (transient) if the endpoint is away or
        failing for a moment (a caller tries again: ``pixelmill.worker.batching``)."""
        bucket, key = split_uri(uri)
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
            size = int(response.get("ContentLength", 0))
            if max_bytes is not None and size > max_bytes:
                response["Body"].close()
                raise BadInput(f"{uri}: object too large ({size} bytes, limit {max_bytes})")
            data = response["Body"].read()
        except BadInput:
            raise
        except Exception as exc:  # noqa: BLE001
            if s3_transient(exc):
                raise StoreError(f"{uri}: cannot fetch the object ({_why(exc)})") from None
            raise BadInput(f"{uri}: cannot fetch the object ({_why(exc)})") from None
        etag = str(response.get("ETag", "")).strip('"')
        return FetchedObject(uri=uri, data=bytes(data), etag=etag)


def _listed(uri: str, obj: dict[str, Any]) -> RemoteObject:
    return RemoteObject(
        uri=uri,
        size=int(obj.get("Size", 0)),
        etag=str(obj.get("ETag", "")).strip('"'),
        modified_ns=_ns(obj.get("LastModified")),
    )


def _ns(when: Any) -> int:
    return int(when.timestamp() * 1e9) if when is not None else 0


_REASONS = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such object (deleted or moved since it was listed?)",
    "404": "no such object (deleted or moved since it was listed?)",
    "AccessDenied": "access denied",
    "403": "access denied",
    "InvalidAccessKeyId": "the access key is not known to the endpoint (bad credentials)",
    "SignatureDoesNotMatch": "the secret key does not match (bad credentials)",
}


def _why(exc: BaseException) -> str:
    """A botocore error in words: the S3 error code's meaning, or the connection problem."""
    code = error_code(exc)
    if code:
        return _REASONS.get(code, f"{code}: {exc}")
    name = type(exc).__name__
    if "Endpoint" in name or "Connect" in name or "Timeout" in name:
        return f"the S3 endpoint did not answer ({exc})"
    if name == "NoCredentialsError":
        return "no credentials (set PIXELMILL_S3_ACCESS_KEY_ID and PIXELMILL_S3_SECRET_ACCESS_KEY)"
    return f"{name}: {exc}"
