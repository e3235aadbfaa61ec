"""The performance harness runs end to end on two cheap items (tiny batches, one repeat)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from gradshield.machine import cpu_family

REPO = Path(__file__).resolve().parents[1]


def test_tables_are_named_by_cpu_family():
    family = cpu_family()
    assert family == family.lower() and " " not in family and family.count("-") >= 1
    vector = family.split("-")[1]
    assert vector in {"amx", "avx512", "avx2", "default", "neon", "sve", "sve256", "vsx", "zvector"}, family


def test_run_quick_writes_json_and_markdown_and_redoes_a_section(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--models", "compact",
               "--only", "gcm,square", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stem = f"performance-{cpu_family()}"
    state = json.loads((tmp_path / f"{stem}.json").read_text())
    assert set(state["sections"]) == {"compact/gcm", "compact/square"}
    for section in state["sections"].values():
        assert section["rows"]
        for row in section["rows"]:
            for times in row["times"].values():
                assert math.isfinite(times["median_s"]) and times["median_s"] > 0
            for check in row["checks"]:
                assert math.isfinite(check["value"]) and check["value"] > 0
    # attack rows count the work each thing did: the ideal makes one forward per query
    for row in state["sections"]["compact/square"]["rows"]:
        passes = row["forward_passes"]
        assert set(passes) == set(row["times"])
        assert passes["ideal"] == row["settings"]["max_queries"]
        assert all(v > 0 for v in passes.values())
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "## Notes on misses" in markdown and "compact/square" in markdown
    assert "forward passes over the batch: ideal" in markdown

    # --resume --redo --only: that section is measured again, every other one is kept as it was
    redo = [*command[:-4], "--only", "gcm", "--out", str(tmp_path), "--resume", "--redo"]
    done = subprocess.run(redo, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((tmp_path / f"{stem}.json").read_text())
    assert again["sections"]["compact/square"] == state["sections"]["compact/square"]
    assert again["sections"]["compact/gcm"]["rows"] != state["sections"]["compact/gcm"]["rows"]
    assert len(again["commands"]) == 2


def test_an_unavailable_device_is_a_clear_error(tmp_path):
    device = "cuda" if not torch.cuda.is_available() else "tpu"
    command = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--device", device,
               "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert done.returncode == 2
    assert f"--device {device}" in done.stderr and "CUDA is available here" in done.stderr
    assert not list(tmp_path.glob("performance*.json"))


def test_allocator_benchmark_times_each_case_with_and_without_kept_memory(tmp_path):
    out = tmp_path / "allocator.json"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_allocator.py"), "--rounds", "1",
               "--repeats", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["family"] == cpu_family() and len(result["cases"]) == 4
    for case in result["cases"].values():
        assert all(t > 0 for t in case["kept_s"] + case["system_s"])
        assert case["kept / system"] == round(case["kept_s"][0] / case["system_s"][0], 3)
