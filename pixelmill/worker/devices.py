"""Device discovery: which devices this host has and how they are named. ``DeviceSpec`` is one
worker process's device (a GPU pinned with ``CUDA_VISIBLE_DEVICES``, or a slot of the CPU);
``parse_devices`` turns ``--devices`` into them. Supervising the processes is
``pixelmill.worker.supervisor``'s business."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from pixelmill.errors import ConfigError
from pixelmill.worker.lifecycle import python_command


@dataclass(frozen=True)
class DeviceSpec:
    label: str  # "cpu" or "cuda:N" (physical index)
    visible: str | None  # what CUDA_VISIBLE_DEVICES is pinned to; None for the CPU
    slot: int = 0  # several CPU workers: 0, 1, ...
    threads: int | None = None  # torch threads for a CPU worker (None: every core)

    @property
    def name(self) -> str:
        """Unique per host: cpu, cpu-1, cuda0 (worker node names and log files)."""
        base = self.label.replace(":", "")
        return f"{base}-{self.slot}" if self.slot else base


def describe_devices(specs: list[DeviceSpec]) -> str:
    """The worker processes one per device, by name: "cuda0, cuda1", or "cpu, cpu-1 (1 torch
    thread each)"."""
    text = ", ".join(d.name for d in specs)
    threads = {d.threads for d in specs if d.visible is None}
    if len(threads) == 1 and None not in threads:
        (n,) = threads
        each = " each" if len(specs) > 1 else ""
        text += f" ({n} torch thread{'s' if n != 1 else ''}{each})"
    return text


def nvidia_driver_present() -> bool:
    """Whether this host has an NVIDIA driver loaded (its /proc entry or device nodes): without
    one, CUDA sees no device, and nobody needs to start torch to find that out."""
    return os.path.isdir("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")


def cuda_device_count() -> int:
    """GPUs visible to this host. Asks in a child process, so this one never touches CUDA
    (and does not ask at all on a host without an NVIDIA driver: a second saved per run)."""
    if not nvidia_driver_present():
        return 0
    try:
        out = subprocess.run(
            python_command("-c", "import torch; print(torch.cuda.device_count())"),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return 0


MAX_AUTO_CPU_WORKERS = 4


def cpu_workers(n: int | None = None) -> list[DeviceSpec]:
    """``n`` CPU worker processes sharing the cores between them. Default: one per core, up
    to 4 (then several torch threads each). Several single-threaded processes beat one
    multi-threaded one here: decoding the next batch then never stalls the forward pass's
    threads (measured: docs/performance.md)."""
    cores = os.cpu_count() or 1
    if n is None:
        n = min(cores, MAX_AUTO_CPU_WORKERS)
    if n < 1:
        raise ConfigError(f"--cpu-workers must be at least 1, got {n}")
    threads = None if n == 1 else max(1, cores // n)
    return [DeviceSpec("cpu", None, slot=i, threads=threads) for i in range(n)]


def parse_devices(spec: str, *, cpu: int | None = None) -> list[DeviceSpec]:
    """``auto`` (every GPU, else the CPU), ``cpu``, or GPU indices such as ``0,2``; ``cpu``
    worker processes when the CPU is used (default: see ``cpu_workers``)."""
    spec = spec.strip().lower()
    if spec == "auto":
        n = cuda_device_count()
        return [DeviceSpec(f"cuda:{i}", str(i)) for i in range(n)] or cpu_workers(cpu)
    if spec == "cpu":
        return cpu_workers(cpu)
    devices = []
    for part in spec.split(","):
        part = part.strip().removeprefix("cuda:")
        if not part.isdigit():
            raise ConfigError(f"--devices: {spec!r} is not auto, cpu, or GPU indices like 0,1")
        devices.append(DeviceSpec(f"cuda:{int(part)}", str(int(part))))
    if len({d.label for d in devices}) != len(devices):
        raise ConfigError(f"--devices: {spec!r} names a GPU twice")
    return devices
