"""The local object store: atomic writes, server-generated keys, nothing outside its root."""

from __future__ import annotations

import hashlib

import pytest

from db.store import LocalStore, artifact_key, open_store
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
