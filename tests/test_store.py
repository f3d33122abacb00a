"""The object stores, local folder and S3 (a real SeaweedFS server): round trips, server-generated
keys only, nothing outside the store, failures as StoreError."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from pixelmill.db.store import LocalStore, S3Store, StoreError, artifact_key, open_store
from pixelmill.errors import ConfigError, PixelmillError


def test_put_then_get_round_trips_with_size_and_sha256(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    key = artifact_key(batch_id="b1", job_id="j1")
    obj = store.put(key, b"\x89PNG data", content_type="image/png")
    assert obj.key == "batches/b1/j1-0.png" and obj.size == 9
    assert obj.sha256 == hashlib.sha256(b"\x89PNG data").hexdigest()
    assert store.get(key) == b"\x89PNG data"
    assert obj.uri == (tmp_path / "store" / key).as_uri()
    store.put(key, b"again", content_type="image/png")  # a retry overwrites the same object
    assert store.get(key) == b"again"
    assert [p.name for p in (tmp_path / "store" / "batches" / "b1").iterdir()] == ["j1-0.png"]


@pytest.mark.parametrize(
    "key",
    ["../escape.png", "batches/../../escape.png", "/etc/passwd", "a//b", "Batches/X.png", ""],
)
def test_keys_that_could_escape_or_were_not_generated_are_refused(tmp_path, key):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(PixelmillError, match="refusing object key"):
        store.put(key, b"x", content_type="image/png")
    with pytest.raises(PixelmillError, match="refusing object key"):
        store.get(key)
    assert not any(tmp_path.rglob("escape.png"))


def test_a_job_id_with_a_path_in_it_cannot_build_a_key():
    with pytest.raises(PixelmillError):
        artifact_key(batch_id="b", job_id="../../x")


def test_unsupported_store_urls_are_config_errors():
    with pytest.raises(ConfigError, match="PIXELMILL_STORE_URL"):
        open_store("ftp://example.com/bucket")


@pytest.fixture
def s3_store(s3_server):
    bucket = s3_server.create_bucket("pm-" + uuid.uuid4().hex[:12])
    return S3Store(
        bucket,
        "artifacts/",
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        timeout=2,
    )


def test_s3_put_then_get_round_trips_under_the_prefix(s3_store, s3_server):
    key = artifact_key(batch_id="b1", job_id="j1")
    obj = s3_store.put(key, b"\x89PNG data", content_type="image/png")
    assert obj.uri == f"s3://{s3_store.bucket}/artifacts/batches/b1/j1-0.png"
    assert obj.sha256 == hashlib.sha256(b"\x89PNG data").hexdigest() and obj.size == 9
    assert s3_store.get(key) == b"\x89PNG data"
    head = s3_server.client().head_object(Bucket=s3_store.bucket, Key=f"artifacts/{key}")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["sha256"] == obj.sha256
    with pytest.raises(StoreError, match="missing-0.png"):
        s3_store.get(artifact_key(batch_id="b1", job_id="missing"))


@pytest.mark.parametrize("key", ["../escape.png", "/etc/passwd", "batches/../../x.png"])
def test_s3_refuses_keys_it_did_not_generate(s3_store, key):
    with pytest.raises(PixelmillError, match="refusing object key"):
        s3_store.put(key, b"x", content_type="image/png")


def test_s3_wrong_credentials_and_an_unresponsive_server_are_store_errors(s3_store, s3_server):
    wrong = S3Store(
        s3_store.bucket,
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key="not-the-secret",
    )
    with pytest.raises(StoreError, match="SignatureDoesNotMatch|AccessDenied"):
        wrong.put("batches/b/j-0.png", b"x", content_type="image/png")
    s3_server.pause()
    try:
        with pytest.raises(StoreError, match="timeout|timed out"):
            s3_store.put("batches/b/j-0.png", b"x", content_type="image/png")
    finally:
        s3_server.resume()
    s3_store.put("batches/b/j-0.png", b"x", content_type="image/png")  # and back again


def test_a_read_is_transient_when_the_store_is_away_and_not_when_the_object_is(
    s3_store, s3_server, tmp_path
):
    """What a worker tries again (``StoreError.transient``): the endpoint down or timing out,
    yes; a missing object, or a key it may not read, no. The same for the local store."""
    s3_store.put("batches/b/j-0.png", b"x", content_type="image/png")
    with pytest.raises(StoreError) as missing:
        s3_store.get("batches/b/nothing-0.png")
    assert not missing.value.transient
    wrong = S3Store(s3_store.bucket, endpoint_url=s3_server.endpoint_url,
                    region=s3_server.region, access_key=s3_server.access_key,
                    secret_key="not-the-secret")  # fmt: skip
    with pytest.raises(StoreError) as refused:
        wrong.get("batches/b/j-0.png")
    assert not refused.value.transient
    s3_server.stop()
    try:
        with pytest.raises(StoreError) as away:
            s3_store.get("batches/b/j-0.png")
        assert away.value.transient
    finally:
        s3_server.start()
    local = LocalStore(tmp_path / "store")
    with pytest.raises(StoreError) as gone:
        local.get("batches/b/nothing-0.png")
    assert not gone.value.transient


def test_store_urls_from_settings(tmp_path, s3_server):
    from pixelmill.settings import load_settings

    settings = load_settings(
        data_dir=tmp_path,
        store_url="s3://pm-bucket/some/prefix",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id="ak",
        s3_secret_access_key="sk-secret",
    )
    store = open_store(settings.resolved_store_url(), settings)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("pm-bucket", "some/prefix")
    assert "sk-secret" not in repr(settings)
    assert settings.to_env()["PIXELMILL_S3_SECRET_ACCESS_KEY"] == "sk-secret"
    with pytest.raises(ConfigError, match="no bucket"):
        open_store("s3:///prefix-only")


def test_a_store_that_fails_a_read_is_a_service_error_exit_3(tmp_path):
    """`results --download` when the store has lost an artifact: one line naming the object,
    exit 3 (a service), not 2 (a usage error)."""
    import subprocess
    import sys

    from pixelmill.db.engine import configured_database
    from pixelmill.db.jobs import claim_jobs, create_batch, write_outcomes
    from pixelmill.db.records import ArtifactRecord, Outcome
    from pixelmill.settings import load_settings

    settings = load_settings(data_dir=tmp_path / "data")
    with configured_database(settings) as database, database.sessions.begin() as s:
        new = create_batch(s, task="generate", model="m", inputs=["a lighthouse"], options={})
        (job,) = claim_jobs(s, new.job_ids, worker="w", device="cpu")
        key = artifact_key(batch_id=new.batch_id, job_id=job.job_id)
        artifact = ArtifactRecord(key=key, uri=f"file:///gone/{key}", content_type="image/png",
                                  size=1, sha256="0" * 64)  # fmt: skip
        write_outcomes(s, [Outcome(job_id=job.job_id, result={}, artifacts=(artifact,))])
    env = {"PATH": "/usr/bin:/bin", "PIXELMILL_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, "-m", "pixelmill", "results", new.batch_id, "--download",
         str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert f"cannot read {key}" in result.stderr
    assert "Traceback" not in result.stderr
