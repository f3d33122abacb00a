"""Configuration: one prefix, validated at start, errors that name the variable."""

from __future__ import annotations

import pytest

from pixelmill.errors import ConfigError
from pixelmill.settings import load_settings, mask_url
from tests.conftest import pixelmill, pixelmill_env


def test_defaults_are_embedded_and_live_in_the_data_dir(tmp_path, monkeypatch):
    for key in ("BROKER_URL", "DATABASE_URL", "STORE_URL"):
        monkeypatch.delenv("PIXELMILL_" + key, raising=False)
    monkeypatch.setenv("PIXELMILL_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert s.embedded_broker
    assert s.resolved_broker_url() == f"redis+socket://{tmp_path.resolve()}/redis.sock"
    assert s.resolved_database_url() == f"sqlite:///{tmp_path}/pixelmill.db"
    assert s.resolved_store_url() == (tmp_path / "store").resolve().as_uri()


def test_a_long_data_dir_gets_a_short_socket_path(tmp_path):
    s = load_settings(data_dir=tmp_path / ("x" * 120))
    assert len(str(s.embedded_socket)) < 100


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PIXELMILL_BROKER_URL", "amqp://guest@localhost//"),
        ("PIXELMILL_DATABASE_URL", "mysql://root@localhost/db"),
        ("PIXELMILL_STORE_URL", "ftp://example/bucket"),
        ("PIXELMILL_BATCH_SIZE", "zero"),
        ("PIXELMILL_BATCH_SIZE", "0"),
    ],
)
def test_invalid_setting_names_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert variable in str(err.value)


def test_supported_urls_are_accepted():
    s = load_settings(
        broker_url="rediss://:secret@redis.example:6380/0",
        database_url="postgresql+psycopg://u:p@db/pixelmill",
        store_url="/srv/pixelmill/store",
    )
    assert s.resolved_store_url() == "file:///srv/pixelmill/store"


def test_mask_url_hides_passwords():
    assert mask_url("redis://:hunter2@host:6379/0") == "redis://:***@host:6379/0"
    assert "hunter2" not in mask_url("postgresql+psycopg://me:hunter2@db/x")
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_cli_rejects_invalid_setting_with_exit_2_and_the_variable_name(tmp_path):
    env = pixelmill_env(data_dir=str(tmp_path), broker_url="http://nope")
    proc = pixelmill("status", "some-batch", env=env)
    assert proc.returncode == 2
    assert "PIXELMILL_BROKER_URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gpu_workers_share_the_hosts_cores_for_decoding(monkeypatch, tmp_path):
    """Two decoding threads cannot feed a GPU: a GPU worker gets the host's cores divided by
    the GPU workers on it (2 to 16); a CPU worker keeps 2; the setting overrides both."""
    from pixelmill.settings import decode_threads

    monkeypatch.setattr("os.cpu_count", lambda: 32)
    settings = load_settings(data_dir=tmp_path)
    assert decode_threads(settings, "cpu") == 2
    assert decode_threads(settings, "cuda:0", gpu_workers=1) == 16
    assert decode_threads(settings, "cuda:0", gpu_workers=4) == 8
    assert decode_threads(settings, "cuda:0", gpu_workers=32) == 2
    pinned = load_settings(data_dir=tmp_path, decode_threads=5)
    assert decode_threads(pinned, "cuda:0", gpu_workers=4) == decode_threads(pinned, "cpu") == 5
