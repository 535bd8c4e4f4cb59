"""sample against its peers: top-p 0.95 at temperature 1, float32 logits, with the bytes floor.

Peers, each drawing one token per row from the same logits:
- ``softmax_multinomial``: ``torch.multinomial(softmax(logits / T), 1)``, no filter at all;
- ``sort_top_p``: the usual torch top-p: sort the row, cumulative softmax, mask the tail,
  renormalise, ``torch.multinomial``.

Floor: the logits read once, tokens (int64) and log-probabilities (float32) written, over the
memory bandwidth (bench/conftest.py says where the rate comes from). Ours also returns each
token's log-probability; the peers do not. Logits are ``2 * randn``: top-p 0.95 then keeps most of
the vocabulary, the hard case for a sampler that must find the threshold.

Run: ``pytest bench/bench_sampling.py --benchmark-enable -s``. CPU rows stop at B * V = 64 *
151,936: the torch peers take seconds per call beyond that on two cores.
"""

from __future__ import annotations

import pytest
import torch
from floors import SAMPLE_BYTES_ARE, ratios, sample_bytes, time_unit
from settings import DEVICES, TINY

from ttscale import backends, ops

OP = "sample"
TOP_P = 0.95
OURS = {"cpu": ("cpu",), "cuda": ("triton",)}  # no CUDA kernel: Triton is the GPU path
PEERS = ("softmax_multinomial", "sort_top_p")
WORKLOADS = [(4, 1000)] if TINY else [
    (b, v) for b in (64, 256, 1024) for v in (32_000, 128_256, 151_936)
]
CPU_MAX_ELEMENTS = 64 * 151_936
PARAMS = [
    pytest.param(device, batch, vocab, impl, id=f"{device}-B{batch}-V{vocab}-{impl}")
    for device in DEVICES
    for batch, vocab in WORKLOADS
    for impl in OURS[device] + PEERS
]


def sample_inputs(batch, vocab, device, top_k=0, top_p=TOP_P, min_p=0.0):
    """The arguments of ``ops.sample`` both sampling benchmarks time: logits ``2 * randn``
    (seeded by the shape), temperature 1 and the given filters on every row."""
    gen = torch.Generator(device=device).manual_seed(batch + vocab)
    logits = torch.randn(batch, vocab, generator=gen, device=device) * 2
    full = lambda value, dtype=torch.float32: torch.full((batch,), value, dtype=dtype,
                                                         device=device)
    return dict(logits=logits, temperature=full(1.0), top_k=full(top_k, torch.int32),
                top_p=full(top_p), min_p=full(min_p), seed=0,
                offsets=torch.arange(batch, device=device))


def softmax_multinomial(logits, temperature, **_):
    return torch.multinomial(torch.softmax(logits / temperature[:, None], -1), 1)


def sort_top_p(logits, temperature, top_p, **_):
    values, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    probs = torch.softmax(values, -1)
    before = torch.cumsum(probs, -1) - probs  # mass of the more likely tokens
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    return order.gather(1, torch.multinomial(probs / probs.sum(-1, keepdim=True), 1))


def floor_cells(tables, table: str, rates, batch: int, vocab: int) -> tuple[dict, dict]:
    """A sampling row's floor: noted over ``table``, and as the row's shown cells (MB, floor)
    and kept data (bytes, ``floor_s``)."""
    unit, per_s = time_unit(rates.device)
    tables.note(table, rates.floor_note(SAMPLE_BYTES_ARE))
    nbytes = sample_bytes(batch, vocab)
    floor = nbytes / rates.bandwidth
    return {"MB": nbytes / 1e6, f"floor {unit}": floor * per_s}, {"bytes": nbytes, "floor_s": floor}


@pytest.mark.parametrize("device,batch,vocab,impl", PARAMS)
def test_sample(device, batch, vocab, impl, measure, machine, tables):
    table = f"{OP}, top-p {TOP_P}, temperature 1 ({device}, float32)"
    unit, per_s = time_unit(device)
    label = f"B={batch} V={vocab}"
    floor_shown, floor_data = floor_cells(tables, table, machine(device), batch, vocab)
    cells = {"workload": label, **floor_shown}
    tables.declare(table, [*cells, *(f"{n} {unit}" for n in OURS[device] + PEERS), "ours ÷ floor",
                           *(f"{p} ÷ ours" for p in PEERS)])
    column = f"{impl} {unit}"
    if device == "cpu" and batch * vocab > CPU_MAX_ELEMENTS:
        tables.note(table, f"rows above B*V = {CPU_MAX_ELEMENTS:,} skipped on the CPU (the "
                    "torch peers take seconds per call there)")
        pytest.skip("too slow for the CPU peers")
    if impl in OURS[device] and impl not in backends.available(OP, device):
        tables.add(table, label, {**cells, column: "n/a"})
        pytest.skip(f"backend {impl} has no {OP} kernel on {device} in this build")

    args = sample_inputs(batch, vocab, device)
    if impl == "softmax_multinomial":
        run = lambda: softmax_multinomial(**args)
    elif impl == "sort_top_p":
        run = lambda: sort_top_p(**args)
    else:
        run = lambda: ops.sample(**args, backend=impl)
    timing = measure(run, device)
    data = tables.add(table, label, {**cells, column: timing.seconds * per_s},
                      {**floor_data, f"{impl}_s": timing.seconds})
    tables.add(table, label, ratios(data, OURS[device], PEERS, data["floor_s"]))
