"""write_kv against torch's indexed assignment, one layer, with the bytes floor of every row.

Rows: a decode step (one new K/V row per sequence, scattered over the pool) and a prompt's
prefill (a run of consecutive slots). Floor: the new rows read once and written once, plus the
slot indices, over the memory bandwidth.

Run: ``pytest bench/bench_write_kv.py --benchmark-enable -s``.
"""

from __future__ import annotations

import pytest
import torch
from floors import ratios, time_unit
from settings import DEVICES, TINY

from ttscale import backends, ops, reference

OP = "write_kv"
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
OURS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
KV_HEADS, BLOCK_SIZE, NUM_BLOCKS = 8, 16, 1024 if TINY else 8192
# (what, rows, head dim): a decode step of N sequences, or one prompt's prefill.
ROWS = (
    [("decode", 16, 64), ("prefill", 40, 128)]
    if TINY
    else [("decode", 256, 64), ("decode", 1024, 128), ("prefill", 2048, 64), ("prefill", 8192, 128)]
)
PARAMS = [
    pytest.param(
        device, what, rows, head_dim, impl, id=f"{device}-{what}-{rows}-D{head_dim}-{impl}"
    )
    for device in DEVICES
    for what, rows, head_dim in ROWS
    for impl in OURS[device] + ("torch_index_put",)
]


@pytest.mark.parametrize("device,what,rows,head_dim,impl", PARAMS)
def test_write_kv(device, what, rows, head_dim, impl, measure, machine, tables):
    dtype = DTYPES[device]
    table = f"{OP}, one layer ({device}, {str(dtype).removeprefix('torch.')})"
    unit, per_s = time_unit(device)
    rates = machine(device)
    tables.note(table, rates.floor_note("new K and V rows read and written once + slots"))
    nbytes = 2 * 2 * rows * KV_HEADS * head_dim * dtype.itemsize + rows * 8
    floor = nbytes / rates.bandwidth
    label = f"{what} rows={rows} Hkv={KV_HEADS} D={head_dim}"
    cells = {"workload": label, "MB": nbytes / 1e6, f"floor {unit}": floor * per_s}
    tables.declare(
        table,
        [*cells, *(f"{b} {unit}" for b in OURS[device]), f"torch_index_put {unit}", "ours ÷ floor"],
    )
    column = f"{impl} {unit}"
    if impl != "torch_index_put" and impl not in backends.available(OP, device):
        tables.add(table, label, {**cells, column: "n/a"})
        pytest.skip(f"backend {impl} has no {OP} kernel on {device} in this build")

    gen = torch.Generator(device=device).manual_seed(0)
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, head_dim)
    k_cache = torch.zeros(shape, dtype=dtype, device=device)
    v_cache = torch.zeros(shape, dtype=dtype, device=device)
    k, v = (
        torch.randn(rows, KV_HEADS, head_dim, generator=gen, device=device, dtype=dtype)
        for _ in range(2)
    )
    if what == "decode":  # one slot in each of `rows` random blocks
        blocks = torch.randperm(NUM_BLOCKS, generator=gen, device=device)[:rows]
        slots = blocks * BLOCK_SIZE + torch.randint(
            0, BLOCK_SIZE, (rows,), generator=gen, device=device
        )
    else:
        slots = torch.arange(rows, device=device) + BLOCK_SIZE * 3

    if impl == "torch_index_put":
        run = lambda: reference.write_kv(k_cache, v_cache, k, v, slots)
    else:
        run = lambda: ops.write_kv(k_cache, v_cache, k, v, slots, backend=impl)
    timing = measure(run, device)
    written = k_cache.view(-1, KV_HEADS, head_dim)[slots]
    assert torch.equal(written, k), f"{impl}: the rows in the pool are not the rows written"
    data = tables.add(
        table,
        label,
        {**cells, column: timing.seconds * per_s},
        {"bytes": nbytes, "floor_s": floor, f"{impl}_s": timing.seconds},
    )
    tables.add(table, label, ratios(data, OURS[device], (), floor))
    print(
        f"\n{table} | {label} | {impl}: {timing.seconds * per_s:.3g} {unit} | "
        f"floor {floor * per_s:.3g} {unit} ({nbytes / 1e6:.2f} MB) | "
        f"{floor / timing.seconds:.0%} of floor"
    )
