"""bench/gpu_report.py, which reads the one GPU run's results: counts and the stage summary."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "bench" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5">
  <testcase classname="tests.test_a" name="test_passes"/>
  <testcase classname="tests.test_a" name="test_fails">
    <failure message="assert 1 == 2">x</failure></testcase>
  <testcase classname="tests.test_a" name="test_skips">
    <skipped message="needs a CUDA device"/></testcase>
  <testcase classname="tests.test_sampling" name="test_sample[triton]">
    <properties><property name="op" value="sample"/></properties></testcase>
  <testcase classname="tests.test_sampling" name="test_sample_gpu[triton]">
    <properties><property name="op" value="sample"/></properties>
    <skipped message="needs a CUDA device"/></testcase>
  <testcase classname="" name="tests.test_model"><error message="collection failure">
ModuleNotFoundError: No module named 'safetensors'</error></testcase>
  <testcase classname="" name="tests.test_b"><error message="collection failure">
ModuleNotFoundError: No module named 'nonexistent_dependency'</error></testcase>
</testsuite></testsuites>
"""


def test_junit_counts_and_files_left_out_for_optional_modules(report, tmp_path):
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT)
    summary = report.junit_summary(path)
    assert (summary["passed"], summary["failed"], summary["errors"], summary["skipped"]) == (2, 1, 1, 2)
    assert summary["by_op"]["sample"] == {"passed": 1, "failed": 0, "errors": 0, "skipped": 1}
    assert summary["by_op"]["(whole model and other)"]["passed"] == 1
    assert "per op: (whole model and other) 1/4 passed (1 skipped), sample 1/2 passed (1 skipped)" in (
        report.junit_line(summary))
    assert summary["not_collected_missing_module"] == {"tests.test_model": "safetensors"}
    assert (
        "not collected, optional module missing: tests.test_model (safetensors)"
        in report.junit_line(summary)
    )


def test_junit_check_fails_on_failures_and_on_a_missing_report(report, tmp_path):
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT)
    assert report.main(["junit", str(path), "--check"]) == 1
    assert report.main(["junit", str(tmp_path / "absent.xml"), "--check"]) == 1
    path.write_text(
        '<testsuites><testsuite><testcase classname="a" name="ok"/></testsuite></testsuites>'
    )
    assert report.main(["junit", str(path), "--check"]) == 0


def test_merge_writes_results_and_fails_when_a_stage_failed(report, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "bench").mkdir(parents=True)
    out.mkdir()
    (work / "stages.tsv").write_text(
        "build\tpassed\t40\tbuilt with pip: CUDA\ntests\tfailed\t80\t1 failed\n"
    )
    (work / "bench" / "status.tsv").write_text("bench_attention\tpassed\t90\trc 0\n")
    (work / "bench" / "bench_attention.json").write_text(
        json.dumps({"text": "== the table", "machines": {}})
    )
    (out / "env.txt").write_text("device NVIDIA H100 80GB HBM3 capability (9, 0)\n")
    assert report.merge(work, out, dry_run=False) == 1
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == "NVIDIA H100 80GB HBM3 capability (9, 0)"
    assert [s["status"] for s in results["stages"]] == ["passed", "failed"]
    assert results["benchmarks"]["bench_attention"]["text"] == "== the table"
    printed = capsys.readouterr().out
    assert "== the table" in printed and printed.rstrip().endswith("NOT PASSED: tests")
