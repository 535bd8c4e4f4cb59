"""prm_step_scores against the unfused torch path a PRM would otherwise run.

The unfused path multiplies the hidden states by the whole lm_head (``[T, V]`` logits), takes a
float32 softmax over the vocabulary, gathers ``+``/``-`` and renormalises; it does not even
aggregate, so it does less than the fused op. The fused op reads the hidden states and two
lm_head rows once, and its floor is those bytes over the device's read bandwidth (measured
here as the rate of ``torch.sum`` over 512 MiB).

Run with ``pytest bench/bench_prm.py -q --benchmark-enable -s`` (``make bench``): pytest-benchmark
records the fused op; the table at the end compares it with the unfused path, timed the same way
(median of several runs after a warm-up; on CUDA with ``triton.testing.do_bench``).

CPU: float32. The unfused path runs only at T=64 there: at T=1024 it is about 1 TFLOP per call
for H=4096, tens of seconds on two cores. GPU: bfloat16, every row.
"""

from __future__ import annotations

import functools
import statistics
import time

import pytest
import torch
from settings import AVAILABLE_DEVICES

from ttscale import ops

VOCAB = 128_256
PLUS_ID, MINUS_ID = 10, 12
STEPS = [64, 1024, 8192]
HIDDEN_SIZES = [2048, 4096]
DEVICES = AVAILABLE_DEVICES  # every device here, whatever TTSCALE_BENCH_DEVICES says
CPU_UNFUSED_MAX_STEPS = 64

ROWS: list[tuple] = []


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, device: str, rounds: int = 5) -> float:
    """Median wall time of ``fn`` after one warm-up call."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.cache
def _read_bandwidth(device: str) -> float:
    """Bytes per second that torch.sum reads over a 512 MiB float32 tensor."""
    x = torch.ones(128 * 2**20, device=device)
    return x.numel() * 4 / _seconds(lambda: x.sum(), device)


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


@functools.lru_cache(maxsize=1)  # one at a time: 2 GB in float32 at H=4096
def _lm_head(device: str, hidden_size: int) -> torch.Tensor:
    return torch.randn(VOCAB, hidden_size, device=device, dtype=_dtype(device)) / hidden_size**0.5


def unfused_two_token(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """P(+) the way a PRM's own code computes it: all logits, softmax, gather, renormalise."""
    probs = torch.softmax((hidden @ lm_head.T).float(), dim=-1)  # [T, V]
    plus, minus = probs[:, PLUS_ID], probs[:, MINUS_ID]
    return plus / (plus + minus)


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    header = ("device", "dtype", "T", "H", "fused us", "unfused us", "MB read", "floor us",
              "fused/floor", "unfused/fused")
    lines = [header]
    for device, dtype, steps, hidden_size, fused, unfused, nbytes, floor in ROWS:
        lines.append((
            device, dtype, str(steps), str(hidden_size), f"{fused * 1e6:.1f}",
            "skipped" if unfused is None else f"{unfused * 1e6:.0f}", f"{nbytes / 1e6:.1f}",
            f"{floor * 1e6:.1f}", f"{fused / floor:.1f}",
            "-" if unfused is None else f"{unfused / fused:.0f}x",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"\nprm_step_scores (two_token, agg=min) vs the unfused path, V={VOCAB}")
    for n, line in enumerate(lines):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


@pytest.mark.parametrize("hidden_size", HIDDEN_SIZES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("device", DEVICES)
def test_prm_step_scores(benchmark, device, steps, hidden_size):
    run_unfused = device == "cuda" or steps <= CPU_UNFUSED_MAX_STEPS
    gen = torch.Generator(device=device).manual_seed(steps + hidden_size)
    hidden = torch.randn(steps, hidden_size, device=device, generator=gen, dtype=_dtype(device))
    if run_unfused:
        lm_head = _lm_head(device, hidden_size)
        head = lm_head[[PLUS_ID, MINUS_ID]].contiguous()
    else:
        head = torch.randn(2, hidden_size, device=device, generator=gen, dtype=_dtype(device))
    num_seqs = max(steps // 4, 1)  # several steps per sequence per call
    seq_ids = torch.arange(steps, device=device) % num_seqs
    state = ops.prm_empty_state(num_seqs, "min", device)

    def fused():
        ops.prm_step_scores(hidden, seq_ids, head, agg="min", state=state)
        _sync(device)

    benchmark.pedantic(fused, rounds=5, warmup_rounds=1)
    fused_s = _seconds(fused, device)
    unfused_s = None
    if run_unfused:
        # Same scores, so the comparison is between equal results.
        torch.testing.assert_close(ops.prm_step_scores(hidden, seq_ids, head, state=state)[0],
                                   unfused_two_token(hidden, lm_head), atol=2e-2, rtol=0)

        def unfused():
            unfused_two_token(hidden, lm_head)
            _sync(device)

        unfused_s = _seconds(unfused, device, rounds=3)
    # hidden and head read; seq_ids (int64) read and scores written; the state read and written
    nbytes = (hidden.numel() + head.numel()) * hidden.element_size() + steps * 12 + num_seqs * 16
    ROWS.append((device, str(hidden.dtype).removeprefix("torch."), steps, hidden_size, fused_s,
                 unfused_s, nbytes, nbytes / _read_bandwidth(device)))
