"""select_and_fork against torch.topk + Python block-table updates (a host-side block manager).

Workload: one beam-search step. ``C`` candidates in groups of ``beams`` (one group per problem)
keep ``beams / 4`` each and fork 4 children apiece; each candidate holds up to 512 tokens of its
own in blocks of 16 after a shared past. Ours runs on the device (the C++ kernel on the CPU,
Triton on a GPU), no host round trip; the peer reads the scores to the host and updates tables,
reference counts and a free list in Python, as an engine without device bookkeeping does.

Run: ``.venv/bin/pytest bench/bench_select.py --benchmark-enable -s``. The table at the end
gives the median time of each, the bytes the step must move (scores, parent and child tables,
reference counts), the floor those bytes set at the device's measured copy bandwidth, and the
ratios.
"""

from __future__ import annotations

import time

import pytest
import torch
from settings import AVAILABLE_DEVICES
from ttscale import ops
from ttscale.testing import make_fork_case

WORKLOADS = [(64, 16), (256, 16), (4096, 64)]  # (candidates, beams per problem)
CHILDREN = 4
DEVICES = AVAILABLE_DEVICES  # every device here, whatever TTSCALE_BENCH_DEVICES says
RESULTS: dict[tuple, dict[str, float]] = {}


def _case(candidates: int, beams: int, device: str):
    return make_fork_case([beams] * (candidates // beams), block_size=16, max_own_tokens=512,
                          spare_blocks=candidates * CHILDREN, seed=candidates, device=device)


def topk_and_python_tables(scores, beams, keep, children, tables, lens, counts, free, block_size):
    """The peer: torch.topk per problem, then tables, counts and free list updated in Python."""
    top = torch.topk(scores.view(-1, beams), keep, dim=1).indices
    kept = (top + torch.arange(0, scores.shape[0], beams, device=scores.device)[:, None]).tolist()
    rows, lengths = tables.tolist(), lens.tolist()
    new_tables, new_lens, copies = [], [], []
    for group in kept:
        for parent in group:
            length = lengths[parent]
            full, partial = divmod(length, block_size)
            for child in range(children):
                table = rows[parent][: full + (1 if partial and child == 0 else 0)]
                for block in table:
                    counts[block] += 1
                if partial and child > 0:
                    fresh = free.pop()
                    copies.append((rows[parent][full], fresh))
                    table.append(fresh)
                    counts[fresh] = 1
                new_tables.append(table)
                new_lens.append(length)
    for row, length in zip(rows, lengths, strict=True):
        for block in row[: -(-length // block_size)]:
            counts[block] -= 1
            if counts[block] == 0:
                free.append(block)
    return new_tables, new_lens, copies


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    x = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    _sync(device)
    return 2 * 5 * x.numel() / (time.perf_counter() - start)


def _bytes(case, beams) -> int:
    groups = case.scores.shape[0] // beams
    slots = groups * (beams // 4) * CHILDREN
    blocks = int((-(-case.lens.long() // 16)).sum())
    width = case.block_tables.shape[1]
    # scores, parent tables and lens read, child tables and lens written, counts read and written
    return 4 * (case.scores.shape[0] * (width + 2) + slots * (width + 2) + 2 * 2 * blocks)


# One torch thread: the C++ kernel is sequential and the peer is Python. (Torn down before the
# report below, which measures the copy bandwidth with every thread.)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not RESULTS:
        return
    print("\n\nselect_and_fork: one beam-search step (keep beams/4 per problem, 4 children each)")
    header = ("device", "candidates", "problems", "ours", "topk+python", "speed-up", "bytes",
              "floor", "ours/floor")
    rows = [header]
    bandwidth = {device: _copy_bandwidth(device) for device in DEVICES}
    for (device, candidates, beams), times in sorted(RESULTS.items()):
        ours, peer = times.get("ours"), times.get("peer")
        if ours is None or peer is None:
            continue
        moved = times["bytes"]
        floor = moved / bandwidth[device]
        rows.append((device, str(candidates), str(candidates // beams), f"{ours * 1e6:.0f} us",
                     f"{peer * 1e6:.0f} us", f"{peer / ours:.1f}x", f"{moved / 1e6:.2f} MB",
                     f"{floor * 1e6:.1f} us", f"{ours / floor:.0f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("candidates,beams", WORKLOADS, ids=[f"C{c}" for c, _ in WORKLOADS])
def test_select_and_fork(benchmark, device, candidates, beams):
    case = _case(candidates, beams, device)
    keep = beams // 4

    def setup():
        pool = case.pool.clone()
        _sync(device)
        return (pool,), {}

    def run(pool):
        ops.select_and_fork(case.scores, case.group_offsets, keep, CHILDREN, case.block_tables,
                            case.lens, pool)
        _sync(device)

    benchmark.pedantic(run, setup=setup, rounds=20, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable: one call, run but not measured
        return
    entry = RESULTS.setdefault((device, candidates, beams), {})
    entry["ours"] = benchmark.stats.stats.median
    entry["bytes"] = _bytes(case, beams)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("candidates,beams", WORKLOADS, ids=[f"C{c}" for c, _ in WORKLOADS])
def test_topk_and_python_tables(benchmark, device, candidates, beams):
    case = _case(candidates, beams, device)
    counts = case.pool.ref_counts.tolist()
    free = case.pool.free_stack[: int(case.pool.free_top[0])].tolist()

    def setup():
        return (list(counts), list(free)), {}

    def run(counts, free):
        topk_and_python_tables(case.scores, beams, beams // 4, CHILDREN, case.block_tables,
                               case.lens, counts, free, 16)

    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: one call, run but not measured
        return
    RESULTS.setdefault((device, candidates, beams), {})["peer"] = benchmark.stats.stats.median
