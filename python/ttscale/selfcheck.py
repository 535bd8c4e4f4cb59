"""``ttscale selfcheck``: every op on every available backend against the reference, as a table.

Each op has a check here: it builds fresh random inputs on a device, runs one backend and the
reference, and returns the largest error relative to the reference's magnitude.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ttscale import backends, ops, reference
from ttscale.testing import make_case, make_prm_case

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.float().cpu(), expected.float().cpu()
    if torch.isnan(a).any():
        return float("inf")
    both_inf = torch.isinf(e) & (a == e)
    diff = torch.where(both_inf, 0.0, (a - e).abs())
    scale = 1 + torch.where(torch.isinf(e), 0.0, e.abs())
    return float((diff / scale).max()) if diff.numel() else 0.0


def _check_decode(device, backend, dtype, seed):
    small = make_case([3, 1, 4], [40, 17, 64], dtype=dtype, device=device, seed=seed)
    # GQA group 8, one sequence with no suffix beside a problem of five, a 600-key prompt split
    # across level-0 programs: Triton is forced into 3 key ranges, in both launch orders (its
    # own launch shape splits only where a GPU has multiprocessors to fill).
    long = make_case([1, 5], [600, 37], [0, 9, 16, 1, 40, 3], q_heads=16, kv_heads=2,
                     dtype=dtype, device=device, seed=seed + 1)
    runs = [(small, None), (long, None)]
    if backend == "triton":
        from ttscale.kernels.cascade_decode import DecodeConfig

        runs[1:] = [(long, DecodeConfig(block_m=16, block_n=64, num_splits=3, suffix_block_n=16,
                                        overlap=overlap)) for overlap in (False, True)]
    worst = 0.0
    for case, config in runs:
        if config is None:
            out, lse = ops.cascade_decode_attention(*case.args(), backend=backend)
        else:
            from ttscale.kernels.cascade_decode import cascade_decode_attention

            plan = ops.plan_cascade_decode(case.problem_ids, case.prompt_lens.shape[0])
            out, lse = cascade_decode_attention(*case.args(), case.q.shape[-1] ** -0.5,
                                                plan.tensors(), config)
        ref_out, ref_lse = reference.cascade_decode_attention(*case.args())
        worst = max(worst, relative_error(out, ref_out), relative_error(lse, ref_lse))
    return worst


def _check_prefill(device, backend, dtype, seed):
    q_lens = [30, 5, 1]
    case = make_case([1, 2], [30, 21], [0, 9, 4], q_rows=sum(q_lens), dtype=dtype, device=device,
                     seed=seed, interleave=False)
    lens = torch.tensor(q_lens, dtype=torch.int32, device=device)
    out, lse = ops.paged_prefill_attention(*case.args(), lens, backend=backend)
    ref_out, ref_lse = reference.paged_prefill_attention(*case.args(), lens)
    return max(relative_error(out, ref_out), relative_error(lse, ref_lse))


def _check_merge(device, backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    o_a, o_b = (torch.randn(33, 4, 64, generator=gen).to(device, dtype) for _ in range(2))
    lse_a, lse_b = (torch.randn(33, 4, generator=gen).to(device) for _ in range(2))
    lse_b[::3] = float("-inf")
    out, lse = ops.merge_attention_states(o_a, lse_a, o_b, lse_b, backend=backend)
    ref_out, ref_lse = reference.merge_attention_states(o_a, lse_a, o_b, lse_b)
    return max(relative_error(out, ref_out), relative_error(lse, ref_lse))


def _check_write_kv(device, backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(5, 16, 2, 64, generator=gen).to(device, dtype)
    k, v = (torch.randn(12, 2, 64, generator=gen).to(device, dtype) for _ in range(2))
    slots = torch.randperm(80, generator=gen)[:12].to(device)
    slots[0] = -1
    got_k, got_v, ref_k, ref_v = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    ops.write_kv(got_k, got_v, k, v, slots, backend=backend)
    reference.write_kv(ref_k, ref_v, k, v, slots)
    return max(relative_error(got_k, ref_k), relative_error(got_v, ref_v))


# op -> check(device, backend, dtype, seed) -> relative error
CHECKS: dict[str, Callable[[str, str, torch.dtype, int], float]] = {
    "cascade_decode_attention": _check_decode,
    "paged_prefill_attention": _check_prefill,
    "merge_attention_states": _check_merge,
    "write_kv": _check_write_kv,
}


def _check_prm(device, backend, dtype, seed):
    worst = 0.0
    heads = (("two_token", "last"), ("two_class", "min"), ("value", "mean"), ("two_token", "prod"))
    for kind, agg in heads:
        case = make_prm_case(37, 200, 5, kind=kind, dtype=dtype, device=device, seed=seed)
        scores, state = ops.prm_step_scores(*case.args(), kind, agg, case.state, backend=backend)
        ref_scores, ref_state = reference.prm_step_scores(*case.args(), kind, agg, case.state)
        worst = max(worst, relative_error(scores, ref_scores), relative_error(state, ref_state))
    return worst


CHECKS["prm_step_scores"] = _check_prm


def _check_select_and_fork(device, backend, dtype, seed):
    """Exact: 0.0 when every output and the pool's state equal the reference's, else inf."""
    from ttscale.testing import make_fork_case

    case = make_fork_case([5, 0, 1, 7, 3], seed=seed, device=device)
    scores = case.scores.to(dtype)
    scores[::4] = float("nan")
    args = (scores, case.group_offsets, 3, 2, case.block_tables, case.lens)
    pool, ref_pool = case.pool.clone(), case.pool.clone()
    got = ops.select_and_fork(*args, pool, backend=backend)
    expected = ops.select_and_fork(*args, ref_pool, backend="torch")
    pairs = [(getattr(got, f), getattr(expected, f)) for f in got.__dataclass_fields__]
    pairs += list(zip(pool.tensors(), ref_pool.tensors(), strict=True))
    same = all(torch.equal(a.cpu(), e.cpu()) for a, e in pairs)
    return 0.0 if same else float("inf")


def _check_copy_blocks(device, backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(2, 9, 16, 2, 64, generator=gen).to(device, dtype) for _ in range(2))
    src = torch.tensor([0, 3, -1, 5], dtype=torch.int32, device=device)
    dst = torch.tensor([7, 1, 2, -1], dtype=torch.int32, device=device)
    got_k, got_v, ref_k, ref_v = k.clone(), v.clone(), k.clone(), v.clone()
    ops.copy_blocks(got_k, got_v, src, dst, backend=backend)
    reference.copy_blocks(ref_k, ref_v, src, dst)
    return max(relative_error(got_k, ref_k), relative_error(got_v, ref_v))


CHECKS["select_and_fork"] = _check_select_and_fork
CHECKS["copy_blocks"] = _check_copy_blocks


def _check_sample(device, backend, dtype, seed):
    """Tokens and top ids must equal the reference's (same random bits); logprobs are compared."""
    from ttscale.testing import make_sampling_case  # kept beside its only use in this file

    case = make_sampling_case(16, 3000, dtype=dtype, device=device, seed=seed)
    tokens, logprobs, (ids, values) = ops.sample(*case.args(seed), 5, backend=backend)
    ref_tokens, ref_logprobs, (ref_ids, ref_values) = reference.sample(*case.args(seed), 5)
    if not (torch.equal(tokens.cpu(), ref_tokens.cpu()) and torch.equal(ids.cpu(), ref_ids.cpu())):
        return float("inf")
    return max(relative_error(logprobs, ref_logprobs), relative_error(values, ref_values))


CHECKS["sample"] = _check_sample


def _check_sample_ties(device, backend, dtype, seed):
    """Logits on a grid of quarter units (ties at every threshold), every row its own top-k,
    top-p and min-p: the tokens must equal the reference's (inf otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    batch, vocab = 24, 2000
    logits = ((torch.randn(batch, vocab, generator=gen) * 8).round() / 4).to(device, dtype)
    f32 = dict(device=device, dtype=torch.float32)
    temperature = torch.linspace(0.0, 1.5, batch, **f32)
    top_k = torch.tensor([0, 1, 5, 40, 128, 300] * 4, dtype=torch.int32, device=device)
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.05] * 6, **f32)
    min_p = torch.tensor([0.0, 0.0, 0.1] * 8, **f32)
    offsets = torch.arange(batch, device=device) * 7919
    args = (logits, temperature, top_k, top_p, min_p, seed, offsets)
    tokens = ops.sample(*args, backend=backend)[0]
    return 0.0 if torch.equal(tokens.cpu(), reference.sample(*args)[0].cpu()) else float("inf")


def _check_add_rms_norm(device, backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, residual = (torch.randn(7, 300, generator=gen).to(device, dtype) for _ in range(2))
    weight = torch.randn(300, generator=gen).to(device, dtype)
    got = ops.add_rms_norm(x, residual, weight, 1e-6, backend=backend)
    expected = reference.add_rms_norm(x, residual, weight, 1e-6)
    return max(relative_error(a, e) for a, e in zip(got, expected, strict=True))


def _check_rope_write_kv(device, backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(5, 8, 64, generator=gen).to(device, dtype)
    k, v = (torch.randn(5, 2, 64, generator=gen).to(device, dtype) for _ in range(2))
    angles = torch.rand(5, 32, generator=gen) * 100
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)
    cache = torch.randn(3, 4, 2, 64, generator=gen).to(device, dtype)
    slots = torch.tensor([7, -1, 0, 11, 4], device=device)
    got_k, got_v, ref_k, ref_v = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    got_q = ops.rope_write_kv(q, k, v, cos_sin, got_k, got_v, slots, backend=backend)
    ref_q = reference.rope_write_kv(q, k, v, cos_sin, ref_k, ref_v, slots)
    return max(relative_error(got_q, ref_q), relative_error(got_k, ref_k),
               relative_error(got_v, ref_v))


def _check_silu_mul(device, backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(6, 2 * 1100, generator=gen).to(device, dtype)
    return relative_error(ops.silu_mul(gate_up, backend=backend), reference.silu_mul(gate_up))


CHECKS["sample (ties)"] = _check_sample_ties
CHECKS["add_rms_norm"] = _check_add_rms_norm
CHECKS["rope_write_kv"] = _check_rope_write_kv
CHECKS["silu_mul"] = _check_silu_mul


def run_selfcheck(device: str | None = None, seed: int = 0) -> int:
    """Print a table of every (op, backend, device, dtype) and return 0 when all pass."""
    devices = [device] if device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows, failures = [], 0
    for dev in devices:
        dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if dev == "cuda" else [])
        for op, check in CHECKS.items():
            for backend in backends.available(op.split()[0], dev):
                if backend == "torch":
                    continue  # the reference itself
                for dtype in dtypes:
                    start = time.perf_counter()
                    try:
                        err = check(dev, backend, dtype, seed)
                        ok = err <= TOLERANCE[dtype]
                        status = "ok" if ok else "MISMATCH"
                    except Exception as exc:  # report, keep checking the rest
                        err, ok, status = float("nan"), False, f"ERROR {type(exc).__name__}: {exc}"
                    failures += not ok
                    ms = (time.perf_counter() - start) * 1e3
                    rows.append((op, backend, dev, str(dtype).removeprefix("torch."), err, ms, status))
    header = ("op", "backend", "device", "dtype", "max rel err", "ms", "status")
    cells = [header] + [(op, be, dev, dt, f"{err:.1e}", f"{ms:.0f}", st) for op, be, dev, dt, err, ms, st in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{len(rows) - failures} of {len(rows)} checks passed")
    return 1 if failures else 0
