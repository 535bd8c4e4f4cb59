"""cascade_decode_attention against its peers, one layer, with the floor of every row.

Workload: N samples of one problem decode one token each; every sample has read the problem's
prompt (level 0) and has its own suffix (level 1). Peers:

- ``sdpa_replicated``: what an engine without prefix sharing does. Each sequence owns a
  contiguous copy of its whole KV, ``[N, Hkv, prompt + suffix, D]`` (built outside the timing),
  and torch's ``scaled_dot_product_attention`` reads it with ``enable_gqa``.
- ``torch_two_level``: the same two-level split as ours in plain torch: the prompt gathered once
  from the paged pool and attended by all N queries as one matrix per KV head, the suffixes
  gathered and attended per sequence, the two merged by log-sum-exp (the reference's pieces).

Floor: bytes that must move (the prompt's KV once, each sequence's suffix KV, q, out and lse)
over the memory bandwidth, or FLOPs over the peak rate where that is larger (see conftest.py for
where each rate comes from). The plan (sequences grouped by problem) is computed once per decode
step and reused by every layer, so it is built outside the timing.

Run: ``pytest bench/bench_attention.py --benchmark-enable -s``. GPU rows are bf16 with the L2
flushed before every call, each implementation captured in a CUDA graph and its replay timed (as
the engine's decode step runs it: kernel time, not the host's launch cost); CPU rows are fp32
and only the shapes that take seconds on 2 cores. ``TTSCALE_BENCH_QUICK=1`` keeps the rows one
short GPU call measures (``bench/gpu.sh``): the target row and the N >= 64 rows at prompt 2048,
plus the target's neighbours in prompt length. ``test_decode_launch_shapes`` times the Triton
kernel's launch shapes at the target row, to tune ``decode_config``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from floors import ratios, time_unit
from settings import DEVICES, QUICK, TINY
from ttscale import backends, ops, reference

OP = "cascade_decode_attention"

# (query heads, KV heads, head dim) of one attention layer.
HEADS = {"Llama-3.2-1B": (32, 8, 64), "Llama-3.1-8B": (32, 8, 128)}
SAMPLES = [4] if TINY else [16, 64, 256, 1024]
PROMPT_LENS = [40] if TINY else [512, 2048, 8192]
SUFFIX_LENS = [16] if TINY else [64, 512]
BLOCK_SIZE = 16
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
OURS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}  # never the Triton interpreter: not a speed
PEERS = ("sdpa_replicated", "torch_two_level")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}

# Larger CPU rows take minutes each on 2 cores.
CPU_MAX_SAMPLES, CPU_MAX_PROMPT = 64, 2048
CPU_SKIP_REASON = (
    f"cpu rows limited to N <= {CPU_MAX_SAMPLES} and prompt <= {CPU_MAX_PROMPT} "
    "(minutes each on 2 cores)"
)


@dataclass(frozen=True)
class Workload:
    model: str
    samples: int
    prompt_len: int
    suffix_len: int

    @property
    def label(self) -> str:
        size = self.model.split("-")[-1]
        return f"{size} N={self.samples} P={self.prompt_len} S={self.suffix_len}"

    def bytes_floor(self, dtype: torch.dtype) -> int:
        q_heads, kv_heads, head_dim = HEADS[self.model]
        item = dtype.itemsize
        prompt_kv = 2 * self.prompt_len * kv_heads * head_dim * item
        suffix_kv = 2 * self.samples * self.suffix_len * kv_heads * head_dim * item
        q_and_out = 2 * self.samples * q_heads * head_dim * item
        lse = self.samples * q_heads * 4
        return prompt_kv + suffix_kv + q_and_out + lse

    def flops(self) -> int:
        q_heads, _, head_dim = HEADS[self.model]
        return 4 * self.samples * q_heads * (self.prompt_len + self.suffix_len) * head_dim

    def fits_cpu(self) -> bool:
        return self.samples <= CPU_MAX_SAMPLES and self.prompt_len <= CPU_MAX_PROMPT


WORKLOADS = [
    Workload(m, n, p, s) for m in HEADS for n in SAMPLES for p in PROMPT_LENS for s in SUFFIX_LENS
]
TARGET = Workload("Llama-3.2-1B", 256, 2048, 64)  # issue 3's target row: at most 20 µs on an H100
if QUICK and not TINY:
    PEERS = ("sdpa_replicated",)  # the engine without prefix sharing; the torch peer takes long
    WORKLOADS = [TARGET] + [
        w for w in WORKLOADS
        if w != TARGET and w.samples >= 64 and (
            w.prompt_len == 2048 or (w.model, w.samples, w.suffix_len) == (TARGET.model, 256, 64))
    ]
def _params(workloads: list[Workload]) -> list:
    return [
        pytest.param(device, w, impl, id=f"{device}-{w.label.replace(' ', '-')}-{impl}")
        for device in DEVICES
        for w in workloads
        for impl in OURS[device] + PEERS
    ]


# The target row has a test of its own, run first, so that a run cut by its time limit has it.
TARGET_PARAMS = _params([w for w in WORKLOADS if w == TARGET])
PARAMS = _params([w for w in WORKLOADS if w != TARGET])


# ---------------------------------------------------------------------------------------------
# Inputs: one problem's prompt and N suffixes in a paged pool with shuffled blocks.


@dataclass
class Inputs:
    q: torch.Tensor  # [N, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, BLOCK_SIZE, Hkv, D]
    v_cache: torch.Tensor
    prompt_block_tables: torch.Tensor  # [1, prompt blocks]
    prompt_lens: torch.Tensor  # [1]
    problem_ids: torch.Tensor  # [N], all 0
    suffix_block_tables: torch.Tensor  # [N, suffix blocks]
    suffix_lens: torch.Tensor  # [N]
    scale: float
    prompt_len: int  # the lengths on the host too: the peers must not read them from the device
    suffix_len: int
    expected: torch.Tensor | None = None  # out of the torch two-level version, for the check

    def args(self):
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.prompt_block_tables,
            self.prompt_lens,
            self.problem_ids,
            self.suffix_block_tables,
            self.suffix_lens,
            self.scale,
        )


_current: dict[tuple, Inputs] = {}  # one workload at a time: the largest pools take GBs


def inputs_for(w: Workload, device: str) -> Inputs:
    key = (w, device)
    if key not in _current:
        _current.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        _current[key] = _build(w, torch.device(device), DTYPES[device])
    return _current[key]


def _build(w: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    q_heads, kv_heads, head_dim = HEADS[w.model]
    gen = torch.Generator(device=device).manual_seed(0)
    prompt_blocks = -(-w.prompt_len // BLOCK_SIZE)
    suffix_blocks = -(-w.suffix_len // BLOCK_SIZE)
    num_blocks = prompt_blocks + w.samples * suffix_blocks
    order = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    i32 = dict(dtype=torch.int32, device=device)
    return Inputs(
        q=randn(w.samples, q_heads, head_dim),
        k_cache=randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim),
        v_cache=randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim),
        prompt_block_tables=order[:prompt_blocks].view(1, prompt_blocks),
        prompt_lens=torch.tensor([w.prompt_len], **i32),
        problem_ids=torch.zeros(w.samples, **i32),
        suffix_block_tables=order[prompt_blocks:].view(w.samples, suffix_blocks),
        suffix_lens=torch.full((w.samples,), w.suffix_len, **i32),
        scale=head_dim**-0.5,
        prompt_len=w.prompt_len,
        suffix_len=w.suffix_len,
    )


# ---------------------------------------------------------------------------------------------
# The peers.


def _suffix_kv(cache: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """Each sequence's suffix rows from the pool: ``[N, suffix_len, Hkv, D]`` (equal lengths)."""
    return cache[inputs.suffix_block_tables.long()].flatten(1, 2)[:, : inputs.suffix_len]


def replicate_kv(cache: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """Each sequence's context as its own contiguous copy: ``[N, Hkv, prompt + suffix, D]``."""
    prompt = reference.gather_blocks(cache, inputs.prompt_block_tables[0], inputs.prompt_len)
    suffix = _suffix_kv(cache, inputs)
    n, kv_heads = suffix.shape[0], cache.shape[2]
    out = cache.new_empty(n, kv_heads, prompt.shape[0] + suffix.shape[1], cache.shape[3])
    out[:, :, : prompt.shape[0]] = prompt.transpose(0, 1)
    out[:, :, prompt.shape[0] :] = suffix.transpose(1, 2)
    return out


def sdpa_replicated(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def _attend(q, k, v, scale):
    """Batched softmax attention and its log-sum-exp: q ``[..., T, D]``, k/v ``[..., L, D]``."""
    scores = (q @ k.transpose(-1, -2)).float() * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype) @ v, lse


def torch_two_level(inputs: Inputs) -> torch.Tensor:
    """Plain-torch cascade for one problem: prompt once for all queries, suffixes per sequence."""
    q, k_cache, v_cache = inputs.q, inputs.k_cache, inputs.v_cache
    n, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    table, prompt_len = inputs.prompt_block_tables[0], inputs.prompt_len
    k0 = reference.gather_blocks(k_cache, table, prompt_len).transpose(0, 1)  # [Hkv, P, D]
    v0 = reference.gather_blocks(v_cache, table, prompt_len).transpose(0, 1)
    # Level 0: all N queries of the problem as one [N * group, D] matrix per KV head.
    q0 = q.view(n, kv_heads, group, head_dim).transpose(0, 1).reshape(kv_heads, n * group, head_dim)
    o0, lse0 = _attend(q0, k0, v0, inputs.scale)  # [Hkv, N * group, D], [Hkv, N * group]
    o0 = o0.view(kv_heads, n, group, head_dim).transpose(0, 1).reshape(n, q_heads, head_dim)
    lse0 = lse0.view(kv_heads, n, group).transpose(0, 1).reshape(n, q_heads)
    # Level 1: each sequence's own suffix.
    k1 = _suffix_kv(k_cache, inputs).permute(0, 2, 1, 3)  # [N, Hkv, S, D]
    v1 = _suffix_kv(v_cache, inputs).permute(0, 2, 1, 3)
    o1, lse1 = _attend(q.view(n, kv_heads, group, head_dim), k1, v1, inputs.scale)
    out, _ = reference.merge_attention_states(
        o0, lse0, o1.reshape(n, q_heads, head_dim), lse1.reshape(n, q_heads)
    )
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark.


def _table(device: str) -> str:
    return f"{OP}, one layer ({device}, {str(DTYPES[device]).removeprefix('torch.')})"


def _row_cells(w: Workload, device: str, machine) -> tuple[dict, dict]:
    dtype = DTYPES[device]
    unit, per_s = time_unit(device)
    nbytes, flops = w.bytes_floor(dtype), w.flops()
    floor = machine.floor_seconds(nbytes, flops)
    cells = {
        "workload": w.label,
        "MB": nbytes / 1e6,
        "GFLOP": flops / 1e9,
        f"floor {unit}": floor * per_s,
    }
    data = {
        "model": w.model,
        "samples": w.samples,
        "prompt_len": w.prompt_len,
        "suffix_len": w.suffix_len,
        "dtype": str(dtype),
        "bytes": nbytes,
        "flops": flops,
        "floor_s": floor,
        "bandwidth": machine.bandwidth,
        "peak_flops": machine.peak_flops,
    }
    return cells, data


def _agrees(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    tol = TOLERANCE[expected.dtype]
    a, e = actual.float(), expected.float()
    return bool(((a - e).abs() <= tol * (1 + e.abs())).all())


def _runner(impl: str, inputs: Inputs):
    """A callable running ``impl`` on ``inputs`` and returning its output ``[N, Hq, D]``."""
    if impl == "torch_two_level":
        return lambda: torch_two_level(inputs)
    if impl == "sdpa_replicated":
        k, v = replicate_kv(inputs.k_cache, inputs), replicate_kv(inputs.v_cache, inputs)
        return lambda: sdpa_replicated(inputs.q, k, v, inputs.scale)
    plan = ops.plan_cascade_decode(inputs.problem_ids, 1)  # once per step, outside the timing
    # As a model's layers after the first call it: the arguments were checked (the first call
    # below checks them), and checking on the host would sit inside the device timing.
    ops.cascade_decode_attention(*inputs.args(), plan=plan, backend=impl)
    return lambda: ops.cascade_decode_attention(*inputs.args(), plan=plan, backend=impl,
                                                validate=False)[0]


def _notes(tables, table: str, device: str, rates) -> None:
    timer = "CUDA-event time of a CUDA graph's replay" if device == "cuda" else "host time"
    tables.note(table, rates.floor_note("prompt KV once + every suffix KV + q + out + lse",
                                        flops=True))
    tables.note(table, f"times: median {timer}, caches flushed before every call")


def _measure_row(device, workload, impl, measure, machine, tables):
    table, (unit, per_s), rates = _table(device), time_unit(device), machine(device)
    _notes(tables, table, device, rates)
    cells, data = _row_cells(workload, device, rates)
    column = f"{impl} {unit}"
    tables.declare(table, [*cells, *(f"{b} {unit}" for b in OURS[device] + PEERS), "ours ÷ floor",
                           *(f"{p} ÷ ours" for p in PEERS)])
    if device == "cpu" and not workload.fits_cpu():
        tables.add(table, workload.label, {**cells, "note": "skipped: " + CPU_SKIP_REASON}, data)
        pytest.skip(CPU_SKIP_REASON)
    if impl in OURS[device] and impl not in backends.available(OP, device):
        tables.add(table, workload.label, {**cells, column: "n/a"}, data)
        pytest.skip(f"backend {impl} has no {OP} kernel on {device} in this build")

    inputs = inputs_for(workload, device)
    try:
        if inputs.expected is None:
            inputs.expected = torch_two_level(inputs)
        run = _runner(impl, inputs)
        agrees = _agrees(run(), inputs.expected)
    except torch.cuda.OutOfMemoryError:
        tables.add(table, workload.label, {**cells, column: "OOM"}, data)
        pytest.skip(f"{impl}: out of memory")
    if not agrees:
        tables.add(table, workload.label, {**cells, column: "WRONG"}, data)
        pytest.fail(f"{impl}: output differs from the torch two-level version")

    timing = measure(run, device, graph=True)
    times = {f"{impl}_s": timing.seconds, f"{impl}_rounds": timing.rounds,
             f"{impl}_graph": timing.graph}
    shown = timing.seconds * per_s
    if device == "cuda" and not timing.graph:
        shown = f"{shown:.3g} (eager)"  # capture failed: this time includes the host's launches
    data = tables.add(
        table,
        workload.label,
        {**cells, column: shown},
        {**data, **times, "measured": timing.measured},
    )
    tables.add(table, workload.label, ratios(data, OURS[device], PEERS, data["floor_s"]))
    print(
        f"\n{table} | {workload.label} | {impl}: {timing.seconds * per_s:.3g} {unit} "
        f"({timing.rounds} rounds{'' if timing.measured else ', unmeasured'}) | "
        f"floor {data['floor_s'] * per_s:.3g} {unit} "
        f"({data['bytes'] / 1e6:.1f} MB, {data['flops'] / 1e9:.2f} GFLOP) | "
        f"{data['floor_s'] / timing.seconds:.0%} of floor"
    )


@pytest.mark.parametrize("device,workload,impl", TARGET_PARAMS)
def test_cascade_decode_attention_target(device, workload, impl, measure, machine, tables):
    _measure_row(device, workload, impl, measure, machine, tables)


# ---------------------------------------------------------------------------------------------
# The Triton kernel's launch shapes at the target row: what decode_config should choose there.

SHAPES_TABLE = "Triton cascade decode launch shapes, target row ({device})"
# (block_m, num_splits, overlap, suffix keys a step, suffix warps); the other fields follow
# decode_config's rules. At the target row 128-row tiles make 64 programs over 8 kv heads and
# 64-row tiles 128, so splits beyond what fills 132 multiprocessors are tried only for the
# taller tiles; with the levels overlapped, level 1's 2,048 programs fill the machine beside
# fewer splits; level 1's tile and warps set its occupancy (its registers: DecodeConfig).
LAUNCH_SHAPES = [(16, 1, False, 16, 4), (16, 3, True, 16, 8)] if TINY else [
    (128, 1, False, 64, 4), (128, 2, False, 64, 4), (128, 3, False, 64, 4),
    (128, 4, False, 64, 4), (128, 8, False, 64, 4), (64, 1, False, 64, 4), (64, 2, False, 64, 4),
    (128, 3, False, 64, 8), (128, 3, False, 32, 4), (128, 3, False, 32, 8),
    (128, 1, True, 64, 4), (128, 2, True, 64, 4), (128, 3, True, 64, 4), (128, 3, True, 64, 8),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_m,num_splits,overlap,suffix_block_n,suffix_warps", LAUNCH_SHAPES)
def test_decode_launch_shapes(device, block_m, num_splits, overlap, suffix_block_n, suffix_warps,
                              measure, machine, tables):
    """One launch shape of the Triton decode kernel at the target row, timed (GPU) or checked.

    On the CPU this runs only under ``TRITON_INTERPRET=1`` (the dry run) and times nothing.
    """
    if "triton" not in backends.available(OP, device):
        pytest.skip(f"no Triton on {device} (the CPU needs TRITON_INTERPRET=1)")
    from ttscale.kernels.cascade_decode import (
        DecodeConfig,
        cascade_decode_attention,
        decode_config,
    )

    w = WORKLOADS[0] if TINY else TARGET
    table = SHAPES_TABLE.format(device=device)
    rates = machine(device)
    inputs = inputs_for(w, device)
    if inputs.expected is None:
        inputs.expected = torch_two_level(inputs)
    plan = ops.plan_cascade_decode(inputs.problem_ids, 1).tensors()
    q_heads, kv_heads, _ = HEADS[w.model]
    chosen = decode_config(w.samples, q_heads, kv_heads, 1, w.prompt_len, w.suffix_len,
                           inputs.q.device)
    config = DecodeConfig(block_m, chosen.block_n, num_splits, suffix_block_n,
                          num_warps=8 if block_m >= 128 else 4, overlap=overlap,
                          suffix_num_warps=suffix_warps)
    floor = rates.floor_seconds(w.bytes_floor(inputs.q.dtype), w.flops())
    how = ("times: median CUDA-event time of a CUDA graph's replay, L2 flushed"
           if device == "cuda" else "the interpreter: each shape checked, not timed")
    tables.note(table, f"{w.label}; floor {floor * 1e6:.1f} µs; {how}; "
                       "* = decode_config's choice here")
    label = ("* " if config == chosen else "") + (
        f"block_m={block_m} splits={num_splits} warps={config.num_warps} "
        f"suffix {suffix_block_n} keys/{suffix_warps} warps" + (" overlapped" if overlap else ""))
    cells = {"launch shape": label}

    def run():
        return cascade_decode_attention(*inputs.args(), plan, config)[0]

    if not _agrees(run(), inputs.expected):
        tables.add(table, label, {**cells, "µs": "WRONG"})
        pytest.fail(f"{config}: output differs from the torch two-level version")
    if device != "cuda":
        tables.add(table, label, {**cells, "µs": "agrees"})
        return
    timing = measure(run, device, graph=True)
    tables.add(table, label, {**cells, "µs": timing.seconds * 1e6,
                              "÷ floor": f"{timing.seconds / floor:.2f}x"},
               {"config": vars(config), "seconds": timing.seconds, "graph": timing.graph,
                "floor_s": floor})
    print(f"\n{table} | {label}: {timing.seconds * 1e6:.1f} µs "
          f"({timing.seconds / floor:.2f}x floor)")


@pytest.mark.parametrize("device,workload,impl", PARAMS)
def test_cascade_decode_attention(device, workload, impl, measure, machine, tables):
    _measure_row(device, workload, impl, measure, machine, tables)
