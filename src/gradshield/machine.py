"""What machine code runs on: the CPU's name and family, and a one-line description of where a
training run's epochs ran (recorded with its metrics, since its times mean nothing without it)."""

from __future__ import annotations

import ctypes
import os
import platform
import re
from pathlib import Path

import torch


def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else what the platform module knows)."""
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_family(name: str | None = None, flags: set[str] | None = None) -> str:
    """A file-name slug for the CPU family: vendor, widest vector unit, and the bf16 matrix
    instructions present, e.g. ``amd-avx512-bf16``, ``amd-avx2`` or ``intel-amx-bf16``."""
    name = (cpu_name() if name is None else name).lower()
    flags = cpu_flags() if flags is None else flags
    vendor = next((v for v in ("amd", "intel", "arm", "apple") if v in name), platform.machine().lower())
    if {"amx_bf16", "amx_tile"} <= flags:
        vector = "amx"
    elif "avx512f" in flags:
        vector = "avx512"
    elif "avx2" in flags:
        vector = "avx2"
    else:
        vector = (torch.backends.cpu.get_cpu_capability() or "default").lower()
    bf16 = "-bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else ""
    return re.sub(r"[^a-z0-9-]+", "-", f"{vendor}-{vector}{bf16}")


def describe(device: torch.device, *, bf16: bool, processes: int = 1) -> str:
    """One line naming where a run computes, e.g. ``"cpu: Intel(R) Xeon(R) Processor
    (intel-amx-bf16), 2 threads, bf16 autocast"``."""
    if device.type == "cuda":
        where = f"cuda: {torch.cuda.get_device_name(device)}"
    elif device.type == "cpu":
        where = f"cpu: {cpu_name()} ({cpu_family()}), {torch.get_num_threads()} threads"
    else:
        where = device.type
    if processes > 1:
        where += f", {processes} processes"
    return f"{where}, {'bf16 autocast' if bf16 else 'float32'}"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the system:
    no ``mmap`` for large blocks, no trimming of the heap. A tensor of a few MB is otherwise a
    fresh mapping whose every page faults on first touch, on every step; on a virtual machine
    that costs more than the arithmetic of an element-wise operation. Process-wide, so only an
    application calls it (the ``gradshield`` command does, at start; importing gradshield never
    does); the process's resident memory then stays near its peak. ``GRADSHIELD_MALLOC=system``
    leaves the allocator alone. True if applied (glibc only)."""
    if os.environ.get("GRADSHIELD_MALLOC", "") == "system" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 256 << 20))
        return all(libc.mallopt(ctypes.c_int(key), ctypes.c_int(value)) == 1 for key, value in settings)
    except (OSError, AttributeError):
        return False
