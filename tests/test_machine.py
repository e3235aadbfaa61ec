"""Where code runs: the CPU family slug of the performance tables, the machine a training run
records with each epoch (its times are that machine's), and the allocator setting of the command."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from gradshield.machine import cpu_family, cpu_name, describe
from gradshield.training import TrainConfig, train


def test_cpu_family_from_the_name_and_flags():
    assert cpu_family("AMD EPYC 9R14", {"avx2", "avx512f", "avx512_bf16"}) == "amd-avx512-bf16"
    assert cpu_family("AMD EPYC 7R13 Processor", {"avx2", "fma"}) == "amd-avx2"
    assert cpu_family("Intel(R) Xeon(R) Processor",
                      {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == "intel-amx-bf16"
    assert cpu_family("Intel(R) Xeon(R) Platinum 8275CL", {"avx2", "avx512f"}) == "intel-avx512"


def test_describe_names_the_device_threads_processes_and_precision():
    line = describe(torch.device("cpu"), bf16=False)
    assert line == f"cpu: {cpu_name()} ({cpu_family()}), {torch.get_num_threads()} threads, float32"
    assert describe(torch.device("cpu"), bf16=True, processes=4).endswith(", 4 processes, bf16 autocast")


def test_each_epoch_records_the_machine_it_ran_on(cifar, tmp_path):
    from gradshield.models import create_model

    torch.manual_seed(0)
    model = create_model("compact", width=0.25)
    history = train(model, cifar[0].subset(128, seed=0), None,
                    TrainConfig(epochs=2, batch_size=64, amp="off"), tmp_path, progress=False)
    assert [r["machine"] for r in history] == [describe(torch.device("cpu"), bf16=False)] * 2


_MALLINFO = """
import ctypes, sys, torch
from gradshield.machine import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2().hblks
x = torch.ones(4 << 20)  # 16 MB
print(applied, libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_keep_freed_memory_serves_large_tensors_from_the_heap_not_fresh_mappings(tmp_path):
    def run(mode, **env):
        done = subprocess.run([sys.executable, "-c", _MALLINFO, mode], capture_output=True, text=True,
                              env={**{k: v for k, v in os.environ.items() if k != "GRADSHIELD_MALLOC"},
                                   **env}, check=True)
        return done.stdout.split()

    assert run("system") == ["None", "1"]   # glibc's default: a 16 MB block is its own mapping
    assert run("keep") == ["True", "0"]     # kept: from the heap, reused after it is freed
    assert run("keep", GRADSHIELD_MALLOC="system") == ["False", "1"]  # the user's opt-out
