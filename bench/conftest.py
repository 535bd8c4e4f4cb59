"""Shared benchmark machinery: timing with the caches flushed, the machine's rates for the
floors, and the readable tables every benchmark prints at the end of the pytest run.

Run a benchmark file with ``pytest bench/bench_X.py --benchmark-enable -s``. Without
``--benchmark-enable`` (pytest-benchmark is disabled in the project's addopts) each row runs once,
unmeasured: a smoke test of the benchmark code.

Environment:
- ``TTSCALE_BENCH_DEVICES``: comma-separated devices to benchmark (default ``cpu``, plus ``cuda``
  when available).
- ``TTSCALE_BENCH_TINY=1``: tiny shapes, to check the benchmark code itself (``bench/gpu.sh
  --dry-run``).
- ``TTSCALE_BENCH_QUICK=1``: the rows one short GPU run measures.
  These three are read once, in ``settings.py``, which the benchmark files import as they build
  their parameters (``settings.TINY_DIMS`` gives the tiny models' dimensions too).
- ``TTSCALE_BENCH_JSON=path``: write every table row, with the machine's rates and versions, to
  this JSON file after every row and at the end (``bench/gpu.sh`` collects them).

Fixtures:
- ``measure(fn, device)`` -> :class:`Timing`: the median time of ``fn()`` through pytest-benchmark,
  with the caches flushed before every call (the GPU's L2; the CPU's caches too, so that a row
  whose data fits in L3 is not timed from cache). On CUDA the time is the device time between
  two CUDA events (as ``triton.testing.do_bench`` measures); host dispatch hides behind the flush
  only while it is shorter than the flush. ``measure(fn, device, graph=True)`` times the replay
  of ``fn`` captured in a CUDA graph instead, as the engine's decode step runs it: the kernels'
  time without the host's launch cost (``Timing.graph`` says whether the capture worked).
- ``machine(device)`` -> :class:`Machine`: memory bandwidth and peak rate the floors are computed
  with, each with a note saying where it comes from.
- ``tables``: :class:`Tables`; ``tables.add(table, row, cells, data)`` merges cells into a row.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field

import pytest
import torch

# The numbers the issues state for an H100, so that GPU floors compare across runs and machines.
H100_COPY_BANDWIDTH = 3.0e12  # bytes/s, measured copy bandwidth of an H100 (read + write)
HOPPER_BF16_PEAK = 989e12  # FLOP/s, dense bf16 tensor-core peak of an H100/H200 SXM

# Written before every timed call: larger than an H100's L2 (50 MB) and than a CPU's L3.
FLUSH_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}


@dataclass
class Timing:
    seconds: float  # median over the rounds
    rounds: int
    measured: bool  # False under --benchmark-disable: one call, not a measurement
    graph: bool = False  # True: the replay of a CUDA graph of fn was timed


@dataclass
class Machine:
    device: str
    name: str
    bandwidth: float  # bytes/s used for the bytes floor
    bandwidth_note: str
    peak_flops: float | None  # FLOP/s used for the compute floor (None: not stated)
    peak_note: str

    def floor_seconds(self, bytes_moved: float, flops: float = 0.0) -> float:
        compute = flops / self.peak_flops if self.peak_flops else 0.0
        return max(bytes_moved / self.bandwidth, compute)

    def floor_note(self, bytes_are: str, flops: bool = False) -> str:
        """The note over a table of floors: the bandwidth the bytes divide by (and, with
        ``flops``, the peak rate the FLOPs divide by, the floor being the larger), and what the
        bytes count (``bytes_are``)."""
        bandwidth = f"{self.bandwidth / 1e9:.0f} GB/s"
        if not flops:
            return f"floor = bytes / {bandwidth} ({self.bandwidth_note}); bytes = {bytes_are}"
        return (f"floor = max(bytes / {bandwidth}, FLOPs / peak); bandwidth: "
                f"{self.bandwidth_note}; peak: {self.peak_note}; bytes = {bytes_are}")


@dataclass
class Tables:
    """Named tables of rows; a row is a dict of display cells plus a dict of raw numbers."""

    notes: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, dict[str, dict]] = field(default_factory=dict)
    columns: dict[str, list[str]] = field(default_factory=dict)  # declared order, optional

    def declare(self, table: str, columns: list[str]) -> None:
        """Fix the order of a table's columns (others follow in the order they first appear)."""
        self.columns.setdefault(table, list(columns))

    def note(self, table: str, text: str) -> None:
        lines = self.notes.setdefault(table, [])
        if text not in lines:
            lines.append(text)

    def add(self, table: str, row: str, cells: dict, data: dict | None = None) -> dict:
        """Merge ``cells`` (shown) and ``data`` (kept in the JSON) into a row; returns its data."""
        entry = self.rows.setdefault(table, {}).setdefault(row, {"cells": {}, "data": {}})
        entry["cells"].update(cells)
        entry["data"].update(data or {})
        return entry["data"]

    def render(self) -> str:
        out = []
        for table in dict.fromkeys([*self.notes, *self.rows]):
            out.append(f"\n== {table}")
            out += [f"   {line}" for line in self.notes.get(table, [])]
            rows = list(self.rows.get(table, {}).values())
            if not rows:
                continue
            seen = [key for row in rows for key in row["cells"]]
            columns = [c for c in dict.fromkeys([*self.columns.get(table, []), *seen]) if c in seen]
            body = [columns] + [[_show(row["cells"].get(c, "-")) for c in columns] for row in rows]
            widths = [max(len(line[i]) for line in body) for i in range(len(columns))]
            for n, line in enumerate(body):
                out.append(
                    "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                )
                if n == 0:
                    out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)

    def as_json(self) -> dict:
        return {
            table: {
                "notes": self.notes.get(table, []),
                "rows": list(self.rows.get(table, {}).values()),
            }
            for table in dict.fromkeys([*self.notes, *self.rows])
        }


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# The machine: flushing, bandwidth and peak rate.

_flush_buffers: dict[torch.device, torch.Tensor] = {}


def flush_caches(device: torch.device) -> None:
    """Evict the caches (the GPU's L2, the CPU's L3) by writing a buffer larger than them."""
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(
            FLUSH_BYTES[device.type], dtype=torch.int8, device=device
        )
    _flush_buffers[device].zero_()


def _best_of(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_machine(device: torch.device) -> Machine:
    """Copy bandwidth (read + write) of a large torch copy, and the rates the floors use."""
    if device.type == "cuda":
        sync = torch.cuda.synchronize
        name = torch.cuda.get_device_name(device)
        nbytes = 2**30
    else:
        sync = lambda: None
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        nbytes = 256 * 2**20
    # Written first: on the CPU a never-written tensor reads as the kernel's one zero page, from
    # cache, and a copy from it ran at about twice the rate of a copy of real data (14.4 against
    # 7.5 GB/s on a 2-core Xeon, 2026-12-07), which halved every bytes floor.
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_bw = 2 * nbytes / _best_of(lambda: dst.copy_(src), 5, sync)
    measured = (
        f"measured here: {copy_bw / 1e9:.1f} GB/s (torch copy of {nbytes >> 20} MB, read + write)"
    )
    if device.type == "cpu":
        # What a kernel that only reads (attention over a KV cache) can hope for: on some CPUs
        # a read-only pass moves fewer bytes a second than a copy's reads and writes together.
        read_bw = nbytes / _best_of(lambda: src.sum(), 5, sync)
        measured += f"; a read-only pass (torch sum) reads {read_bw / 1e9:.1f} GB/s"
    if device.type == "cuda":
        hopper = any(tag in name for tag in ("H100", "H200"))
        if "H100" in name:
            bw, bw_note = (
                H100_COPY_BANDWIDTH,
                f"3.0 TB/s, the H100's measured copy bandwidth; {measured}",
            )
        else:
            bw, bw_note = copy_bw, measured
        peak = HOPPER_BF16_PEAK if hopper else None
        peak_note = "989 TFLOP/s dense bf16 (Hopper SXM)" if hopper else "not stated for this GPU"
        return Machine("cuda", name, bw, bw_note, peak, peak_note)
    a = torch.randn(2048, 2048)
    mm = 2 * 2048**3 / _best_of(lambda: torch.mm(a, a), 3, sync)
    peak_note = f"measured here: {mm / 1e9:.0f} GFLOP/s (fp32 torch.mm 2048x2048)"
    return Machine("cpu", name, copy_bw, measured, mm, peak_note)


# ---------------------------------------------------------------------------------------------
# Fixtures and hooks.

_TABLES = pytest.StashKey[Tables]()
_MACHINES = pytest.StashKey[dict]()
_ENABLED = pytest.StashKey[bool]()  # whether pytest-benchmark measured (not --benchmark-disable)


def pytest_configure(config):
    config.stash[_TABLES] = Tables()
    config.stash[_MACHINES] = {}


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's rows: on a machine whose cores are shared, torch's
    two-thread ops wait milliseconds for the second thread, which would be timed with them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tables(pytestconfig) -> Tables:
    return pytestconfig.stash[_TABLES]


@pytest.fixture(scope="session")
def machine(pytestconfig):
    machines = pytestconfig.stash[_MACHINES]

    def get(device) -> Machine:
        device = torch.device(device)
        if device.type not in machines:
            machines[device.type] = measure_machine(device)
        return machines[device.type]

    return get


@pytest.fixture
def measure(benchmark, pytestconfig):
    def run(
        fn,
        device,
        budget_s: float | None = None,
        min_rounds: int | None = None,
        max_rounds: int = 100,
        graph: bool = False,
    ) -> Timing:
        device = torch.device(device)
        pytestconfig.stash[_ENABLED] = not benchmark.disabled
        if device.type == "cuda":
            replay = _graph_replay(fn, device) if graph else None
            timing = _measure_cuda(
                benchmark, replay or fn, device, budget_s or 0.15, min_rounds or 10, max_rounds
            )
            timing.graph = replay is not None
            return timing
        return _measure_host(benchmark, fn, budget_s or 1.0, min_rounds or 3, min(max_rounds, 50))

    return run


def _measure_host(benchmark, fn, budget_s, min_rounds, max_rounds) -> Timing:
    flush = lambda: flush_caches(torch.device("cpu"))
    fn()  # warm-up: first-call costs (allocation, compilation) stay out of the numbers
    flush()
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(first, 1e-6))))
    if benchmark.disabled:  # pedantic then calls fn once and keeps no statistics
        benchmark.pedantic(fn, setup=flush)
        return Timing(first, 1, False)
    benchmark.pedantic(fn, setup=flush, rounds=rounds, iterations=1)
    return Timing(benchmark.stats.stats.median, rounds, True)


def _graph_replay(fn, device):
    """``fn`` captured in a CUDA graph, as its replay; None where ``fn`` cannot be captured."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # e.g. a host read of device memory: timed without a graph
        print(f"\nnot capturable in a CUDA graph, timed eagerly: {type(error).__name__}: {error}")
        torch.cuda.synchronize(device)
        return None
    return graph.replay


def _measure_cuda(benchmark, fn, device, budget_s, min_rounds, max_rounds) -> Timing:
    pairs = []

    def timed():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))

    def seconds():
        torch.cuda.synchronize(device)
        times = sorted(start.elapsed_time(end) * 1e-3 for start, end in pairs)
        pairs.clear()
        return times

    flush = lambda: flush_caches(device)
    fn()  # warm-up (Triton compiles on first call)
    flush()
    timed()
    first = seconds()[0]
    if benchmark.disabled:  # pedantic then calls fn once and keeps no statistics
        benchmark.pedantic(timed, setup=flush)
        return Timing(seconds()[0], 1, False)
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(first, 1e-6))))
    # The setup flush is not timed by pytest-benchmark, and `timed` does not wait for the GPU,
    # so the host runs ahead and the events bracket only fn's kernels.
    benchmark.pedantic(timed, setup=flush, rounds=rounds, iterations=1)
    times = seconds()
    # pytest-benchmark timed the host's launches; give it the device times instead, so that its
    # own tables and --benchmark-json report what the GPU spent.
    data = getattr(getattr(benchmark.stats, "stats", None), "data", None)
    if isinstance(data, list):
        data[:] = times
    return Timing(times[len(times) // 2], rounds, True)


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "ttscale"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    versions["cuda"] = torch.version.cuda
    return versions


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tables = config.stash.get(_TABLES, None)
    if tables is None or not (tables.rows or tables.notes):
        return
    terminalreporter.write_sep("=", "benchmark tables")
    for m in config.stash[_MACHINES].values():
        terminalreporter.write_line(
            f"{m.device}: {m.name}; bandwidth {m.bandwidth_note}; peak {m.peak_note}"
        )
    terminalreporter.write_line(tables.render())


def _write_json(config) -> None:
    path = os.environ.get("TTSCALE_BENCH_JSON")
    tables = config.stash.get(_TABLES, None)
    if not path or tables is None:
        return
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "benchmark_enabled": config.stash.get(_ENABLED, None),
        "versions": _versions(),
        "machines": {k: vars(m) for k, m in config.stash[_MACHINES].items()},
        "tables": tables.as_json(),
        "text": tables.render(),
    }
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def pytest_runtest_teardown(item, nextitem):
    # After every row, so that a run killed by its time limit keeps the rows it measured.
    _write_json(item.config)


def pytest_sessionfinish(session, exitstatus):
    _write_json(session.config)
