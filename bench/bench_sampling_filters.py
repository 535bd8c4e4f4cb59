"""sample at the target row (B=256, V=151,936, float32 logits) under each filter, with the
bytes floor: which settings read the logits once and which twice.

Settings (temperature 1, logits ``2 * randn``):
- ``top-p 0.95``: the candidates and the probe pass (two reads of the logits);
- ``top-k 50`` and ``top-k 50, top-p 0.95``: the top-k groups gathered from pass 1's group
  maxima, no second read (the usual serving settings);
- ``min-p 0.05``: the candidates, no probe pass;
- ``top-k 1000``: beyond what the Triton kernel gathers: the candidates and the probe pass,
  then the whole-row search for the rows where no candidate is kept.

Floor: the logits read once, tokens (int64) and log-probabilities (float32) written, over the
memory bandwidth. Run: ``pytest bench/bench_sampling_filters.py --benchmark-enable -s``.
"""

from __future__ import annotations

import os

import pytest
import torch
from ttscale import backends, ops

OP = "sample"
TINY = os.environ.get("TTSCALE_BENCH_TINY", "0") not in ("", "0")
DEVICES = os.environ.get("TTSCALE_BENCH_DEVICES") or (
    "cpu,cuda" if torch.cuda.is_available() else "cpu"
)
OURS = {"cpu": "cpu", "cuda": "triton"}
SHAPES = {"cpu": (16, 151_936), "cuda": (256, 151_936)}  # the CPU's row: seconds otherwise
if TINY:
    SHAPES = {"cpu": (4, 1000), "cuda": (4, 1000)}
SETTINGS = {  # name: (top_k, top_p, min_p)
    "top-p 0.95": (0, 0.95, 0.0),
    "top-k 50": (50, 1.0, 0.0),
    "top-k 50, top-p 0.95": (50, 0.95, 0.0),
    "min-p 0.05": (0, 1.0, 0.05),
    "top-k 1000": (1000, 1.0, 0.0),
}
PARAMS = [
    pytest.param(device, name, id=f"{device}-{name.replace(' ', '').replace(',', '-')}")
    for device in DEVICES.split(",")
    for name in SETTINGS
]


@pytest.mark.parametrize("device,setting", PARAMS)
def test_sample_filters(device, setting, measure, machine, tables):
    batch, vocab = SHAPES[device]
    impl = OURS[device]
    table = f"{OP} by filter, B={batch} V={vocab}, temperature 1 ({device}, float32)"
    unit, per_s = ("µs", 1e6) if device == "cuda" else ("ms", 1e3)
    rates = machine(device)
    tables.note(table, f"floor = bytes / {rates.bandwidth / 1e9:.0f} GB/s ({rates.bandwidth_note});"
                " bytes = logits read once + tokens and logprobs written")
    nbytes = batch * vocab * 4 + batch * (8 + 4)
    floor = nbytes / rates.bandwidth
    cells = {"filters": setting, "MB": nbytes / 1e6, f"floor {unit}": floor * per_s}
    tables.declare(table, [*cells, f"{impl} {unit}", "ours ÷ floor"])
    if impl not in backends.available(OP, device):
        tables.add(table, setting, {**cells, f"{impl} {unit}": "n/a"})
        pytest.skip(f"backend {impl} has no {OP} kernel on {device} in this build")
    top_k, top_p, min_p = SETTINGS[setting]
    gen = torch.Generator(device=device).manual_seed(batch + vocab)
    full = lambda value, dtype=torch.float32: torch.full((batch,), value, dtype=dtype,
                                                         device=device)
    args = dict(logits=torch.randn(batch, vocab, generator=gen, device=device) * 2,
                temperature=full(1.0), top_k=full(top_k, torch.int32), top_p=full(top_p),
                min_p=full(min_p), seed=0, offsets=torch.arange(batch, device=device))
    timing = measure(lambda: ops.sample(**args, backend=impl), device)
    tables.add(table, setting, {**cells, f"{impl} {unit}": timing.seconds * per_s,
                                "ours ÷ floor": f"{timing.seconds / floor:.3g}x"},
               {"bytes": nbytes, "floor_s": floor, f"{impl}_s": timing.seconds})
