"""Requests that arrive over time: continuous admission against a closed batch and one at a time.

Workload: 64 requests (a prompt of 64 random token ids each, n=4 samples, 32 new tokens, EOS
ignored, temperature 1) arriving as a Poisson stream (seeded), on bench_engine.py's CPU model
(Qwen2-shaped, 19.5M parameters, fp32). Three ways to serve them, on one engine:

- ``continuous``: each request is added when it arrives and joins the running batch at the next
  scheduler step (``LLM.add_request`` / ``LLM.step``), as a server runs it;
- ``closed batch``: the engine waits for the last arrival, then runs all 64 as one batch (how a
  closed-batch engine serves a stream); a request's wait for the batch counts in its TTFT;
- ``one at a time``: each request runs alone, in arrival order, after the previous one ends.

Each row prints generated tokens per second over the whole stream (first arrival to last
token), and the median and 99th percentile of time to first token (arrival to the step that
produced the request's first tokens). Run: ``pytest bench/bench_arrivals.py --benchmark-enable
-s`` (without ``--benchmark-enable`` one short stream runs, unmeasured: a smoke test).
"""

from __future__ import annotations

import os
import random
import statistics
import time

import pytest
import torch
from bench_engine import QWEN2_20M, TINY_QWEN2, write_model
from settings import TINY

from ttscale.llm import LLM
from ttscale.sampling_params import SamplingParams

TABLE = "requests arriving as a Poisson stream (cpu, float32)"
REQUESTS, SAMPLES, PROMPT, NEW = (8, 2, 16, 4) if TINY else (64, 4, 64, 32)
RATE = 12.0  # requests per second: the stream spans about five seconds


def arrivals(count: int, rate: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (count, length), generator=gen).tolist()


def serve(llm: LLM, requests: list[list[int]], at: list[float], params: SamplingParams,
          start: float | None = None):
    """Add each request at its arrival time (relative to ``start``) and step until all finish.
    Returns per request the time of its first tokens and of its end, relative to ``start``."""
    start = time.perf_counter() if start is None else start
    first: dict[int, float] = {}
    end: dict[int, float] = {}
    index: dict[str, int] = {}
    waiting = 0
    while waiting < len(requests) or llm.has_unfinished_requests():
        now = time.perf_counter() - start
        while waiting < len(requests) and at[waiting] <= now:
            index[llm.add_request(requests[waiting], params)] = waiting
            waiting += 1
        if not llm.has_unfinished_requests():
            time.sleep(max(at[waiting] - now, 0.0))
            continue
        for out in llm.step():
            k = index[out.request_id]
            t = time.perf_counter() - start
            if k not in first and any(c.token_ids for c in out.outputs):
                first[k] = t
            if out.finished:
                end[k] = t
    return first, end


def row(name: str, at: list[float], first: dict, end: dict, tokens: int) -> dict:
    ttft = sorted(first[k] - at[k] for k in range(len(at)))
    wall = max(end.values()) - at[0]
    p99 = ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]
    return {"mode": name, "requests": len(at), "tokens": tokens, "wall s": round(wall, 2),
            "tokens/s": round(tokens / wall), "TTFT median ms": round(statistics.median(ttft) * 1e3),
            "TTFT p99 ms": round(p99 * 1e3)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(TINY_QWEN2 if TINY else QWEN2_20M, tmp_path_factory.mktemp("arrivals"), "cpu")


def test_arrival_patterns(model_dir, tables, request):
    measured = request.config.getoption("--benchmark-enable", default=False)
    count = REQUESTS if measured else min(REQUESTS, 8)
    params = SamplingParams(n=SAMPLES, temperature=1.0, max_tokens=NEW, ignore_eos=True, seed=0)
    vocab = (TINY_QWEN2 if TINY else QWEN2_20M).config["vocab_size"]
    requests = prompts(count, PROMPT, vocab)
    at = arrivals(count, RATE)
    tokens = count * SAMPLES * NEW
    llm = LLM(model_dir, device="cpu", kv_budget_bytes=512 << 20, prefix_caching=False)
    llm.generate(requests[:2], SamplingParams(n=2, max_tokens=4), use_tqdm=False)  # warm-up

    rows = []
    first, end = serve(llm, requests, at, params)
    rows.append(row("continuous", at, first, end, tokens))

    # closed batch: formed at the last arrival
    at_zero = [0.0] * count
    first, end = serve(llm, requests, at_zero, params)
    shift = at[-1]
    rows.append(row("closed batch", at, {k: v + shift for k, v in first.items()},
                    {k: v + shift for k, v in end.items()}, tokens))

    # one at a time, in arrival order
    first, end, free_at = {}, {}, 0.0
    for k in range(count):
        begin = max(at[k], free_at)
        f, e = serve(llm, [requests[k]], [0.0], params)
        first[k], end[k] = begin + f[0], begin + e[0]
        free_at = end[k]
    rows.append(row("one at a time", at, first, end, tokens))

    tables.note(TABLE, f"{count} requests, Poisson {RATE}/s (seed 0), n={SAMPLES}, prompt "
                       f"{PROMPT}, {NEW} new tokens, EOS ignored; model "
                       f"{(TINY_QWEN2 if TINY else QWEN2_20M).name}; torch threads "
                       f"{torch.get_num_threads()}, OMP_WAIT_POLICY="
                       f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
                       + ("" if measured else "; NOT MEASURED (smoke run)"))
    tables.note(TABLE, "wall: first arrival to last token; TTFT: arrival to the step that gave "
                       "the request its first tokens; closed batch: formed at the last arrival")
    batch = rows[1]["tokens/s"]
    for r in rows:
        r["vs closed batch"] = f"{r['tokens/s'] / batch:.2f}x"
        tables.add(TABLE, r["mode"], r, dict(r))
    assert all(r["tokens"] == tokens for r in rows)
