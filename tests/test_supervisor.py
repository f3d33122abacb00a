"""Device selection for `pixelmill worker --devices`."""

from __future__ import annotations

import os

import pytest

from pixelmill.errors import ConfigError
from worker.supervisor import DeviceSpec, parse_devices


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
