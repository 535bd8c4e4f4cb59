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

import pytest
from bench_sampling import OP, floor_cells, sample_inputs
from floors import ratios, time_unit
from settings import DEVICES, TINY

from ttscale import backends, ops

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
    for device in DEVICES
    for name in SETTINGS
]


@pytest.mark.parametrize("device,setting", PARAMS)
def test_sample_filters(device, setting, measure, machine, tables):
    batch, vocab = SHAPES[device]
    impl = OURS[device]
    table = f"{OP} by filter, B={batch} V={vocab}, temperature 1 ({device}, float32)"
    unit, per_s = time_unit(device)
    floor_shown, floor_data = floor_cells(tables, table, machine(device), batch, vocab)
    cells = {"filters": setting, **floor_shown}
    tables.declare(table, [*cells, f"{impl} {unit}", "ours ÷ floor"])
    if impl not in backends.available(OP, device):
        tables.add(table, setting, {**cells, f"{impl} {unit}": "n/a"})
        pytest.skip(f"backend {impl} has no {OP} kernel on {device} in this build")
    top_k, top_p, min_p = SETTINGS[setting]
    args = sample_inputs(batch, vocab, device, top_k, top_p, min_p)
    timing = measure(lambda: ops.sample(**args, backend=impl), device)
    data = tables.add(table, setting, {**cells, f"{impl} {unit}": timing.seconds * per_s},
                      {**floor_data, f"{impl}_s": timing.seconds})
    tables.add(table, setting, ratios(data, (impl,), (), data["floor_s"]))
