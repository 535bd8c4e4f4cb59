"""bf16 and fp16 on the CPU backends, op by op, against the float32 reference.

Users run bf16. The CPU backends (the C++ kernels and the torch backend) take bf16/fp16 inputs,
widen them exactly to float32, compute in float32 and round the result once. So the reference,
run in float32 on the same (already rounded) inputs, bounds their error by:

- the final rounding: half an ulp of the output dtype, ``u * |ref|`` with ``u = eps / 2``;
- float32 arithmetic: a sum of ``L`` terms in another order differs by at most ``gamma(L) =
  L * u32 / (1 - L * u32)`` times the sum of the terms' magnitudes (Higham, Accuracy and
  Stability of Numerical Algorithms, 3.1). Attention has two such sums: the scores (``D`` terms,
  magnitude ``scale * sum |q_d k_d|``; an error ``e`` in a score moves its weight by a factor
  ``exp(e)``) and the weighted values (``L`` context rows, magnitude at most ``max |v|``).

The tolerances below are those formulas (with a factor 2 for the kernels' and the reference's
errors adding up, and a few ulps of float32 for exp and log), computed from the inputs, never
fitted to what a kernel gives. Triton stays out: its interpreter gets bf16 dots wrong
(TOOLCHAIN.md); it runs bf16 in the GPU tests.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from paged import missing_feature

from ttscale import backends, ops, reference
from ttscale.testing import make_case

LOW = [torch.bfloat16, torch.float16]
U32 = torch.finfo(torch.float32).eps / 2
EXP_ULPS = 4  # float32 exp/log of the kernels: a few ulps each


def cpu_backends(op: str):
    """The backends that run ``op`` on CPU tensors: the torch backend and the C++ kernels."""
    params = [pytest.param("torch", id="torch")]
    if "cpu" in backends.MODULES[op]:
        why = missing_feature("cpu", "cpu")
        params.append(pytest.param("cpu", id="cpu", marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def widened(case):
    """The same case with float32 copies of its (already rounded) q, K and V."""
    return (case.q.float(), case.k_cache.float(), case.v_cache.float(), *case.args()[3:])


def attention_bound(case, q_lens=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output element, the bound on |kernel - float32 reference| that the module docstring
    derives, and per (row, head) the bound on the log-sum-exp."""
    args = widened(case)
    q, k_cache, v_cache = args[:3]
    scale = q.shape[-1] ** -0.5
    # the score sum's magnitude: the reference on |q| and |K| gives scale * max_l sum_d |q_d k_ld|
    # as an upper bound through its log-sum-exp (logsumexp >= max); a safe, cheap stand-in is
    # scale * ||q||_1 * max |k|.
    k_max = k_cache.abs().max()
    score_mag = scale * q.abs().sum(-1) * k_max  # [rows, Hq]
    context = int((case.prompt_lens.max() if case.prompt_lens.numel() else 0)
                  + (case.suffix_lens.max() if case.suffix_lens.numel() else 0))
    d = q.shape[-1]
    score_err = 2 * gamma(d) * score_mag + EXP_ULPS * U32  # relative error of each weight
    v_max = v_cache.abs().max()
    run = reference.cascade_decode_attention if q_lens is None else reference.paged_prefill_attention
    ref_out, _ = run(*args) if q_lens is None else run(*args, q_lens)
    out_bound = (unit_roundoff(case.q.dtype) * ref_out.abs()
                 + (score_err.unsqueeze(-1) + 2 * gamma(context + 1)) * v_max)
    lse_bound = score_err + 2 * gamma(context + 1) + EXP_ULPS * U32
    return out_bound, lse_bound


def assert_within(actual, expected, bound, what: str, seed: int):
    assert not torch.isnan(actual).any(), f"{what}: NaN in the output (seed {seed})"
    a, e = actual.float(), expected.float()
    both_inf = torch.isinf(e) & (a == e)
    err = torch.where(both_inf, 0.0, (a - e).abs())
    over = err - bound
    worst = int(over.flatten().argmax())
    assert over.max() <= 0, (
        f"{what}: error {err.flatten()[worst]:.3g} over its bound {bound.flatten()[worst]:.3g} at "
        f"flat index {worst} (value {e.flatten()[worst]:.4g}; max error {err.max():.3g}; seed {seed})")


DECODE = [("mixed", [3, 1, 2], [40, 7, 129], None), ("long_prompt", [2], [300], [17, 64])]


def check_decode(run, dtype, name, seqs, prompts, suffixes):
    seed = zlib.crc32(f"decode-{name}".encode())
    case = make_case(seqs, prompts, suffixes, dtype=dtype, head_dim=64, seed=seed)
    out, lse = run(case)
    ref_out, ref_lse = reference.cascade_decode_attention(*widened(case))
    out_bound, lse_bound = attention_bound(case)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_within(out, ref_out, out_bound, "out", seed)
    assert_within(lse, ref_lse, lse_bound, "lse", seed)


@pytest.mark.parametrize("backend", cpu_backends("cascade_decode_attention"))
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name,seqs,prompts,suffixes", DECODE, ids=[x[0] for x in DECODE])
def test_decode_low_precision(backend, dtype, name, seqs, prompts, suffixes):
    check_decode(lambda case: ops.cascade_decode_attention(*case.args(), backend=backend),
                 dtype, name, seqs, prompts, suffixes)


PREFILL = [("chunks", [2, 1], [33, 70], [9, 17, 30], [9, 4, 30]), ("into_prompt", [1], [48], [5], [20])]


@pytest.mark.parametrize("backend", cpu_backends("paged_prefill_attention"))
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name,seqs,prompts,suffixes,q_lens", PREFILL, ids=[x[0] for x in PREFILL])
def test_prefill_low_precision(backend, dtype, name, seqs, prompts, suffixes, q_lens):
    seed = zlib.crc32(f"prefill-{name}".encode())
    case = make_case(seqs, prompts, suffixes, q_rows=sum(q_lens), dtype=dtype, seed=seed, interleave=False)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32)
    out, lse = ops.paged_prefill_attention(*case.args(), q_lens_t, backend=backend)
    ref_out, ref_lse = reference.paged_prefill_attention(*widened(case), q_lens_t)
    out_bound, lse_bound = attention_bound(case, q_lens_t)
    assert out.dtype == dtype
    assert_within(out, ref_out, out_bound, "out", seed)
    assert_within(lse, ref_lse, lse_bound, "lse", seed)


def _states(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    o_a, o_b = (torch.randn(41, 4, 64, generator=gen).to(dtype) for _ in range(2))
    lse_a, lse_b = (torch.randn(41, 4, generator=gen) * 3 for _ in range(2))
    lse_b[::5] = float("-inf")  # an empty level
    return o_a, lse_a, o_b, lse_b


@pytest.mark.parametrize("backend", cpu_backends("merge_attention_states"))
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_merge_low_precision(backend, dtype):
    seed = 31
    o_a, lse_a, o_b, lse_b = _states(dtype, seed)
    out, lse = ops.merge_attention_states(o_a, lse_a, o_b, lse_b, backend=backend)
    ref_out, ref_lse = reference.merge_attention_states(o_a.float(), lse_a, o_b.float(), lse_b)
    # two weights exp(lse_x - lse), each a few ulps of float32, times |o|; then one rounding
    magnitude = torch.maximum(o_a.float().abs(), o_b.float().abs())
    out_bound = unit_roundoff(dtype) * ref_out.abs() + 2 * (2 * EXP_ULPS * U32) * magnitude
    assert out.dtype == dtype
    assert_within(out, ref_out, out_bound, "out", seed)
    assert_within(lse, ref_lse, EXP_ULPS * U32 * (1 + ref_lse.abs()), "lse", seed)


@pytest.mark.parametrize("backend", cpu_backends("write_kv"))
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_write_kv_low_precision_is_exact(backend, dtype):
    gen = torch.Generator().manual_seed(12)
    num_blocks, block_size, kv_heads, dim = 5, 16, 2, 64
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    k, v = (torch.randn(23, kv_heads, dim, generator=gen).to(dtype) for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:23].to(torch.int32)
    slots[[0, 7]] = -1
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ops.write_kv(k_cache, v_cache, k, v, slots, backend=backend)
    reference.write_kv(ref_k, ref_v, k, v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)  # a scatter rounds nothing


@pytest.mark.parametrize("backend", cpu_backends("copy_blocks"))
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_copy_blocks_low_precision_is_exact(backend, dtype):
    gen = torch.Generator().manual_seed(13)
    k_cache, v_cache = (torch.randn(3, 8, 16, 2, 32, generator=gen).to(dtype) for _ in range(2))
    src = torch.tensor([1, 4, -1], dtype=torch.int32)
    dst = torch.tensor([6, 2, 0], dtype=torch.int32)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ops.copy_blocks(k_cache, v_cache, src, dst, backend=backend)
    reference.copy_blocks(ref_k, ref_v, src, dst)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


# ---------------------------------------------------------------------------------------------
# The bounds catch a wrong kernel: a test double of the C++ (or torch) decode kernel whose output
# is 2% too large, as a mis-scaled bf16 conversion would make it, fails the same check.


@pytest.mark.parametrize("backend", cpu_backends("cascade_decode_attention"))
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_a_two_percent_scale_error_fails_the_bf16_check(backend, dtype):
    def wrong(case):
        out, lse = ops.cascade_decode_attention(*case.args(), backend=backend)
        return (out.float() * 1.02).to(dtype), lse

    name, seqs, prompts, suffixes = DECODE[0]
    with pytest.raises(AssertionError, match="over its bound"):
        check_decode(wrong, dtype, name, seqs, prompts, suffixes)
