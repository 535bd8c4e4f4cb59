"""The decode step's fused elementwise ops against the model's unfused torch code, with the
bytes floor of every row.

Ops, at a decode step of T tokens (one per sequence) for two model shapes, bf16 on the GPU:
- ``add_rms_norm``: residual add + RMSNorm (floor: x and residual read, sum and norm written);
- ``rope_write_kv``: q and k rotated, k and v written into the pool (floor: q, k, v and the
  float32 angles read, the rotated q and the K/V rows written);
- ``silu_mul``: ``silu(gate) * up`` (floor: gate and up read, the product written).
Peer: ``unfused``, the torch code the model runs on the CPU (``model/transformer.py``), which
is what a GPU step ran before these kernels. On the CPU only the peer and the reference run
(the CPU keeps the unfused code).

Run: ``pytest bench/bench_fused_elementwise.py --benchmark-enable -s``.
"""

from __future__ import annotations

import pytest
import torch
from floors import ratios, time_unit
from settings import DEVICES, TINY

from ttscale import backends, ops
from ttscale.model.rope import apply_rotary

DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
OURS = {"cpu": ("torch",), "cuda": ("triton",)}
# name: (hidden, q heads, kv heads, head dim, intermediate)
MODELS = {"Llama-3.2-1B": (2048, 32, 8, 64, 8192), "Llama-3.1-8B": (4096, 32, 8, 128, 14336)}
TOKENS = {"cpu": (16,), "cuda": (256, 4096)}
if TINY:
    MODELS = {"tiny": (96, 4, 2, 16, 160)}
    TOKENS = {"cpu": (5,), "cuda": (5,)}
OPS = ("add_rms_norm", "rope_write_kv", "silu_mul")
BLOCK_SIZE = 16

PARAMS = [
    pytest.param(device, op, model, tokens, impl, id=f"{device}-{op}-{model}-T{tokens}-{impl}")
    for device in DEVICES
    for op in OPS
    for model in MODELS
    for tokens in TOKENS[device]
    for impl in OURS[device] + ("unfused",)
]


def _workload(op, model, tokens, dtype, device):
    """(run functions by impl, bytes moved once) for one op at one shape."""
    hidden, q_heads, kv_heads, head_dim, inner = MODELS[model]
    gen = torch.Generator(device=device).manual_seed(tokens)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)
    size = dtype.itemsize
    if op == "add_rms_norm":
        x, residual, weight = randn(tokens, hidden), randn(tokens, hidden), randn(hidden)

        def unfused():
            summed = residual + x
            s = summed.float()
            return weight * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

        ours = lambda impl: ops.add_rms_norm(x, residual, weight, 1e-6, backend=impl,
                                             validate=False)
        return ours, unfused, 4 * tokens * hidden * size + hidden * size
    if op == "rope_write_kv":
        qkv = randn(tokens, (q_heads + 2 * kv_heads) * head_dim)
        q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
        angles = torch.rand(tokens, head_dim // 2, generator=gen, device=device) * 1000
        cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
        num_blocks = 2 * tokens // BLOCK_SIZE + 2
        k_cache = torch.zeros(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype,
                              device=device)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device=device)[:tokens]

        def unfused():
            k_rot = apply_rotary(k, cos_sin)
            ops.write_kv(k_cache, v_cache, k_rot, v, slots, validate=False)
            return apply_rotary(q, cos_sin)

        ours = lambda impl: ops.rope_write_kv(q, k, v, cos_sin, k_cache, v_cache, slots,
                                              backend=impl, validate=False)
        moved = 2 * tokens * (q_heads + 2 * kv_heads) * head_dim * size + cos_sin.nbytes
        return ours, unfused, moved + tokens * 8
    gate_up = randn(tokens, 2 * inner)

    def unfused():
        gate, up = gate_up.split(inner, dim=-1)
        return torch.nn.functional.silu(gate) * up

    ours = lambda impl: ops.silu_mul(gate_up, backend=impl)
    return ours, unfused, 3 * tokens * inner * size


@pytest.mark.parametrize("device,op,model,tokens,impl", PARAMS)
def test_fused_elementwise(device, op, model, tokens, impl, measure, machine, tables):
    dtype = DTYPES[device]
    table = f"fused elementwise ops, one layer ({device}, {str(dtype).removeprefix('torch.')})"
    unit, per_s = time_unit(device)
    rates = machine(device)
    tables.note(table, rates.floor_note("each input read once, each output written once"))
    ours_fn, unfused, nbytes = _workload(op, model, tokens, dtype, device)
    floor = nbytes / rates.bandwidth
    label = f"{op} {model} T={tokens}"
    cells = {"workload": label, "MB": nbytes / 1e6, f"floor {unit}": floor * per_s}
    tables.declare(table, [*cells, *(f"{b} {unit}" for b in OURS[device]), f"unfused {unit}",
                           "ours ÷ floor", "unfused ÷ ours"])
    column = f"{impl} {unit}"
    if impl != "unfused" and impl not in backends.available(op, device):
        tables.add(table, label, {**cells, column: "n/a"})
        pytest.skip(f"backend {impl} has no {op} kernel on {device} in this build")
    run = unfused if impl == "unfused" else (lambda: ours_fn(impl))
    timing = measure(run, device)
    data = tables.add(table, label, {**cells, column: timing.seconds * per_s},
                      {"bytes": nbytes, "floor_s": floor, f"{impl}_s": timing.seconds})
    tables.add(table, label, ratios(data, OURS[device], ("unfused",), floor))


def test_reference_is_the_unfused_code():
    """The rows compare like with like: the reference computes what the unfused peer does."""
    for op in OPS:
        ours_fn, unfused, _ = _workload(op, next(iter(MODELS)), 3, torch.float32, "cpu")
        expected = unfused()
        got = ours_fn("torch")
        got = got[0] if op == "add_rms_norm" else got
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
