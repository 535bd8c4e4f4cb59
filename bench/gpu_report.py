"""The report of bench/gpu.sh: test counts from JUnit XML, and results.json from every stage.

Standard library only, so that it runs whatever else is broken on the machine.

    python bench/gpu_report.py junit REPORT.xml [--check]
        one line of counts; with --check, exit 1 when a test failed or errored (a test file that
        could not be collected because an optional module is missing counts as skipped)
    python bench/gpu_report.py merge --work DIR --out DIR --dry-run 0|1
        $OUT/results.json from the stages, the tests, the sanitizer and the benchmark JSONs;
        prints the benchmark tables and then the stage summary
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

OPTIONAL_MODULES = os.environ.get(
    "OPTIONAL_MODULES", "hypothesis safetensors tokenizers math_verify transformers"
).split()
MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")


def junit_summary(path: Path) -> dict:
    """Counts, failing test ids, and the files left out for a missing optional module."""
    if not path.exists():
        return {"report": False}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    by_op: dict[str, dict[str, int]] = {}
    failing, not_collected = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        ops = [p.get("value") for p in case.iter("property") if p.get("name") == "op"]
        op = ops[0] if ops else "(whole model and other)"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            text = f"{problem.get('message', '')}\n{problem.text or ''}"
            missing = MISSING_MODULE.search(text)
            if missing and missing.group(1).split(".")[0] in OPTIONAL_MODULES:
                not_collected[name] = missing.group(1)
                continue
            status = "failed" if problem.tag == "failure" else "errors"
            failing.append(f"{name}: {problem.get('message', '')[:200]}")
        elif case.find("skipped") is not None:
            status = "skipped"
        else:
            status = "passed"
        counts[status] += 1
        by_op.setdefault(op, dict.fromkeys(counts, 0))[status] += 1
    return {
        "report": True,
        **counts,
        "by_op": {op: by_op[op] for op in sorted(by_op)},
        "failing": failing,
        "not_collected_missing_module": not_collected,
    }


def junit_line(summary: dict) -> str:
    if not summary.get("report"):
        return "no JUnit report"
    line = ", ".join(f"{summary[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
    if summary["not_collected_missing_module"]:
        left = ", ".join(f"{n} ({m})" for n, m in summary["not_collected_missing_module"].items())
        line += f"; not collected, optional module missing: {left}"
    by_op = summary.get("by_op") or {}
    if by_op:
        line += "; per op: " + ", ".join(
            f"{op} {c['passed']}/{sum(c.values())} passed" + (f" ({c['skipped']} skipped)" if c["skipped"] else "")
            for op, c in by_op.items())
    return line


def read_tsv(path: Path, keys: tuple[str, ...]) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        row = dict(zip(keys, fields + [""] * (len(keys) - len(fields)), strict=False))
        if row.get("seconds", "").isdigit():
            row["seconds"] = int(row["seconds"])
        rows.append(row)
    return rows


def device_line(env_txt: Path) -> str:
    if env_txt.exists():
        for line in env_txt.read_text().splitlines():
            if line.startswith("device "):
                return line.removeprefix("device ")
    return "no CUDA device"


def merge(work: Path, out: Path, dry_run: bool) -> int:
    stages = read_tsv(work / "stages.tsv", ("name", "status", "seconds", "note"))
    bench_files = read_tsv(work / "bench" / "status.tsv", ("name", "status", "seconds", "note"))
    benchmarks = {}
    for path in sorted((work / "bench").glob("*.json")):
        try:
            benchmarks[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            benchmarks[path.stem] = {"error": f"unreadable JSON: {error}"}
    tests, sanitizer = junit_summary(work / "tests.xml"), junit_summary(work / "sanitizer.xml")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "dry_run": dry_run,
        "device": device_line(out / "env.txt"),
        "stages": stages,
        "tests": tests,
        "sanitizer": sanitizer,
        "bench_files": bench_files,
        "benchmarks": benchmarks,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))

    for name, bench in benchmarks.items():
        print(f"\n######## {name}")
        for device, m in bench.get("machines", {}).items():
            print(f"{device}: {m['name']}; bandwidth {m['bandwidth_note']}; peak {m['peak_note']}")
        print(bench.get("text") or bench.get("error", "(no rows)"))
    for what, summary in (("tests", tests), ("sanitizer", sanitizer)):
        for line in summary.get("failing", [])[:15]:
            print(f"{what} FAILED: {line}")
    print(f"\n######## gpu.sh summary ({'dry run, ' if dry_run else ''}{result['device']})")
    width = max([len(s["name"]) for s in stages + bench_files] + [5])
    for s in stages:
        print(f"{s['name']:<{width + 2}}  {s['status']:<8} {s['seconds']:>4}s  {s['note']}")
        if s["name"] == "bench":
            for b in bench_files:
                print(f"  {b['name']:<{width}}  {b['status']:<8} {b['seconds']:>4}s  {b['note']}")
    bad = [s["name"] for s in stages if s["status"] in ("failed", "timeout")]
    print(f"results: {out / 'results.json'}")
    print(
        "all stages passed or were skipped with a reason"
        if not bad
        else f"NOT PASSED: {', '.join(bad)}"
    )
    return 0 if not bad else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    junit = commands.add_parser("junit")
    junit.add_argument("report", type=Path)
    junit.add_argument("--check", action="store_true")
    merged = commands.add_parser("merge")
    merged.add_argument("--work", type=Path, required=True)
    merged.add_argument("--out", type=Path, required=True)
    merged.add_argument("--dry-run", default="0")
    args = parser.parse_args(argv)
    if args.command == "junit":
        summary = junit_summary(args.report)
        print(junit_line(summary))
        if args.check:
            return (
                0 if summary.get("report") and not (summary["failed"] or summary["errors"]) else 1
            )
        return 0
    return merge(args.work, args.out, args.dry_run not in ("", "0"))


if __name__ == "__main__":
    sys.exit(main())
