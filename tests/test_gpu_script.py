"""bench/gpu.sh's dry run on the CPU: the plumbing of `make gpu` and `make gpu-headline`.

Each run skips the environment and build stages (the package is already importable here) and
selects a few benchmark rows, so that the script's stages, benchmark list, selection and report
run end to end in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path, *args, **env):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TRITON_INTERPRET": "1",
             **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return result.stdout, json.loads((out / "results.json").read_text())


def test_make_gpu_fits_five_minutes_and_checks_the_launch_shapes(tmp_path):
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("triton")
    printed, results = _dry_run(tmp_path, GPU_SH_STAGES="bench",
                                GPU_SH_BENCH_SELECT="launch_shapes")
    assert "budget 270s" in printed
    assert "benchmarks: attention sampling sampling_filters fused_elementwise" in printed
    files = {row["name"]: row["status"] for row in results["bench_files"]}
    # the selection matches nothing in the other files: skipped, not failed
    assert files == {"bench_attention": "passed", "bench_sampling": "skipped",
                     "bench_sampling_filters": "skipped", "bench_fused_elementwise": "skipped"}
    table = results["benchmarks"]["bench_attention"]["tables"]
    rows = table["Triton cascade decode launch shapes, target row (cpu)"]["rows"]
    assert [row["cells"]["µs"] for row in rows] == ["agrees", "agrees"]


@pytest.mark.slow
def test_make_gpu_headline_runs_only_the_tokasaurus_workload(tmp_path):
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("transformers")
    printed, results = _dry_run(tmp_path, "--headline", GPU_SH_STAGES="bench")
    assert "headline: 1" in printed and "budget 590s" in printed
    assert [row["name"] for row in results["bench_files"]] == ["bench_engine"]
    tables = results["benchmarks"]["bench_engine"]["tables"]
    assert list(tables) == ["Tokasaurus repeated-sampling workload (cpu, float32)"]
