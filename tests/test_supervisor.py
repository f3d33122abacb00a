"""Device selection for `pixelmill worker --devices`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pixelmill.errors import ConfigError
from pixelmill.worker.devices import DeviceSpec, parse_devices


def test_explicit_gpu_indices_are_pinned_one_per_worker():
    assert parse_devices("0,2") == [DeviceSpec("cuda:0", "0"), DeviceSpec("cuda:2", "2")]
    assert parse_devices("cuda:1") == [DeviceSpec("cuda:1", "1")]


def test_cpu_and_auto_without_a_gpu_give_cpu_workers():
    assert parse_devices("cpu", cpu=1) == [DeviceSpec("cpu", None)]
    cores = os.cpu_count() or 1
    assert len(parse_devices("cpu")) == min(cores, 4)
    # This machine (and CI) has no GPU: auto falls back to the CPU.
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert parse_devices("auto") == parse_devices("cpu")


@pytest.mark.parametrize("spec", ["gpu", "0,0", "1,x"])
def test_bad_device_specs_are_config_errors(spec):
    with pytest.raises(ConfigError, match="--devices"):
        parse_devices(spec)


def test_several_cpu_workers_share_the_cores_under_distinct_names():
    two = parse_devices("cpu", cpu=2)
    assert [d.name for d in two] == ["cpu", "cpu-1"]
    assert all(d.label == "cpu" and d.threads == max(1, (os.cpu_count() or 1) // 2) for d in two)
    with pytest.raises(ConfigError, match="--cpu-workers"):
        parse_devices("cpu", cpu=0)


def test_a_gpu_worker_is_spawned_pinned_to_its_device(tmp_path, redis_server):
    """No GPU here, but the pinning is real: the child process of cuda:3 sees only GPU 3
    (CUDA_VISIBLE_DEVICES=3), is a fresh process (spawned, not forked) and names itself
    pixelmill-cuda3 for Flower; the CPU workers see no GPU at all."""
    from pixelmill.settings import load_settings
    from pixelmill.worker.supervisor import Supervisor

    settings = load_settings(data_dir=tmp_path, broker_url=redis_server.url,
                             database_url=f"sqlite:///{tmp_path / 'db.sqlite'}")  # fmt: skip
    specs = [DeviceSpec("cuda:3", "3"), *parse_devices("cpu", cpu=2)]
    supervisor = Supervisor(specs, settings=settings, log_dir=tmp_path / "logs").start()
    try:
        envs, argv = {}, {}
        for child in supervisor.children:
            proc = Path("/proc") / str(child.process.pid)
            # Popen returns once the child's close-on-exec pipe closes, which the kernel does
            # before it fills in the new image's argv and environment: wait for them.
            deadline = time.monotonic() + 30
            while b"PIXELMILL_BROKER_URL=" not in (raw_env := (proc / "environ").read_bytes()):
                assert time.monotonic() < deadline, f"{child.device.name} never exec'd"
                time.sleep(0.01)
            raw_argv = (proc / "cmdline").read_bytes()
            raw = raw_env.split(b"\0")
            envs[child.device.name] = dict(x.decode().split("=", 1) for x in raw if b"=" in x)
            argv[child.device.name] = raw_argv
        assert envs["cuda3"]["CUDA_VISIBLE_DEVICES"] == "3"
        assert envs["cpu"]["CUDA_VISIBLE_DEVICES"] == envs["cpu-1"]["CUDA_VISIBLE_DEVICES"] == ""
        assert b"worker.device_main\0--device\0cuda:3" in argv["cuda3"]
        assert b"--gpu-workers\x001" in argv["cuda3"]  # one GPU: it decodes on the spare cores
        assert b"--gpu-workers" not in argv["cpu"]
        assert envs["cuda3"]["PIXELMILL_BROKER_URL"] == redis_server.url
        deadline = time.monotonic() + 120
        log = tmp_path / "logs" / "worker-cuda3.log"
        while "pixelmill-cuda3@" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the worker never named itself"
            time.sleep(0.5)
    finally:
        supervisor.stop(timeout=60)
    assert supervisor.alive == 0


def test_precision_is_half_on_a_gpu_and_fp32_on_the_cpu(monkeypatch):
    """The CUDA device is the edge we cannot run here: only its bf16 query is stubbed."""
    import torch

    from pixelmill.models.device import autocast, resolve_precision, torch_dtype

    assert resolve_precision("cpu") == "fp32" and resolve_precision("cpu", "bf16") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("cuda:0") == "fp16"
    assert resolve_precision("cuda:0", "fp32") == "fp32"
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("fp32") is torch.float32
    ctx = autocast("cuda:0", "bf16")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype is torch.bfloat16
    assert not isinstance(autocast("cpu", "fp32"), torch.autocast)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("cuda:0", "int3")
