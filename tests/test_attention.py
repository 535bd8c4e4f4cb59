"""The attention ops on every available backend against the plain-torch reference."""

from __future__ import annotations

import zlib

import pytest
import torch
from paged import assert_close, backend_params, make_case

from ttscale import ops, reference

DTYPES = [torch.float32, torch.float16]  # bf16 runs in the GPU tests (the Triton interpreter gets bf16 dots wrong)

# (name, seqs per problem, prompt lengths, suffix lengths or None for random)
LAYOUTS = [
    ("one_sequence", [1], [37], [5]),
    ("many_problems_uneven", [3, 1, 5], [16, 50, 3], None),
    ("empty_suffixes", [2, 2], [33, 20], [0, 0, 0, 0]),
    ("empty_prompt", [3], [0], [7, 0, 19]),
    ("all_empty", [2], [0], [0, 0]),
    ("prompt_not_block_multiple", [4], [47], [1, 16, 17, 31]),
]


def _decode(case, backend, **kw):
    return ops.cascade_decode_attention(*case.args(), backend=backend, **kw)


@pytest.mark.parametrize("backend,device", backend_params("cascade_decode_attention"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,seqs,prompts,suffixes", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_decode_matches_reference(backend, device, dtype, name, seqs, prompts, suffixes):
    case = make_case(seqs, prompts, suffixes, dtype=dtype, device=device, seed=zlib.crc32(name.encode()) % 1000)
    out, lse = _decode(case, backend)
    ref_out, ref_lse = reference.cascade_decode_attention(*case.args())
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("backend,device", backend_params("cascade_decode_attention"))
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "gqa8"])
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_decode_gqa_and_head_dims(backend, device, q_heads, kv_heads, head_dim):
    case = make_case([2, 3], [21, 40], q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                     device=device, seed=q_heads * 100 + head_dim)
    out, lse = _decode(case, backend)
    ref_out, ref_lse = reference.cascade_decode_attention(*case.args())
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")


@pytest.mark.parametrize("backend,device", backend_params("cascade_decode_attention"))
@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_decode_block_sizes(backend, device, block_size):
    case = make_case([3, 2], [70, 9], block_size=block_size, device=device, seed=block_size)
    out, lse = _decode(case, backend)
    ref_out, ref_lse = reference.cascade_decode_attention(*case.args())
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")


@pytest.mark.parametrize("backend,device", backend_params("cascade_decode_attention"))
def test_decode_with_precomputed_plan_and_scale(backend, device):
    case = make_case([5, 1, 2], [30, 12, 64], device=device, seed=11)
    plan = ops.plan_cascade_decode(case.problem_ids, case.prompt_lens.shape[0])
    out, lse = _decode(case, backend, plan=plan, scale=0.3)
    ref_out, ref_lse = reference.cascade_decode_attention(*case.args(), scale=0.3)
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")


@pytest.mark.parametrize("backend,device", backend_params("cascade_decode_attention"))
def test_decode_empty_suffix_equals_prompt_only_attention(backend, device):
    case = make_case([3], [45], [0, 0, 0], device=device, seed=5)
    out, lse = _decode(case, backend)
    k = reference.gather_blocks(case.k_cache, case.prompt_block_tables[0], 45)
    v = reference.gather_blocks(case.v_cache, case.prompt_block_tables[0], 45)
    expected, expected_lse = reference.attend(case.q, k, v, case.q.shape[-1] ** -0.5)
    assert_close(out, expected, torch.float32, "out")
    assert_close(lse, expected_lse, torch.float32, "lse")


# The C++ kernel's tilings: level 0 takes a problem's rows 64 at a time (up to 256 in one work
# item) and its prompt 64 keys at a time; level 1 takes the suffix 64 tokens and 16 query heads at
# a time. These layouts cross each of those edges, with GQA groups 1, 3, 4, 7 and 8 and head dims
# that are not a multiple of 16 (8 is below one vector).
TILING_LAYOUTS = [
    # (name, seqs per problem, prompt lens, suffix lens or None, q heads, kv heads, head dim)
    ("rows_past_one_tile", [20], [70], None, 8, 2, 64),
    ("rows_past_one_item", [70, 3], [65, 130], None, 8, 2, 32),
    ("rows_not_a_lane_multiple", [5], [129], [70, 0, 1, 64, 65], 6, 2, 40),
    ("long_prompt_one_kv_head", [2], [700], [3, 130], 1, 1, 64),
    ("group_of_eight_tiny_head", [3], [33], [17, 2, 90], 16, 2, 8),
    ("group_of_seven", [4, 1], [100, 5], None, 14, 2, 80),
]


@pytest.mark.parametrize("backend,device", backend_params("cascade_decode_attention"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,seqs,prompts,suffixes,q_heads,kv_heads,head_dim", TILING_LAYOUTS,
                         ids=[x[0] for x in TILING_LAYOUTS])
def test_decode_across_tile_edges(backend, device, dtype, name, seqs, prompts, suffixes, q_heads,
                                  kv_heads, head_dim):
    case = make_case(seqs, prompts, suffixes, q_heads=q_heads, kv_heads=kv_heads,
                     head_dim=head_dim, dtype=dtype, device=device,
                     seed=zlib.crc32(name.encode()) % 1000)
    out, lse = _decode(case, backend)
    ref_out, ref_lse = reference.cascade_decode_attention(*case.args())
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


def test_cpu_decode_gives_the_same_bits_on_any_thread_count():
    """The C++ kernel splits long prompts into key ranges by the shapes alone (a split changes
    the order of the sums), so 1 and 4 threads give equal bits; the split path is also checked
    against the reference here. torch's thread count is the kernel's (one OpenMP runtime)."""
    from paged import missing_feature

    if (why := missing_feature("cpu", "cpu")) is not None:
        pytest.skip(why)
    case = make_case([3, 1], [1100, 300], [5, 70, 0, 16], q_heads=2, kv_heads=1, seed=4)
    _same_bits_on_1_and_4_threads(case)


def test_cpu_decode_gives_the_same_bits_when_threads_split_the_kv_heads():
    """With fewer sequences than threads the C++ kernel's suffix level takes a sequence's kv
    heads in ranges, so a row's queries land in a full 16-row block (packed, keys loaded once a
    group) on one thread and in a partial block (a key pointer per row) on several: both must
    sum each row's dot products in the same order."""
    from paged import missing_feature

    if (why := missing_feature("cpu", "cpu")) is not None:
        pytest.skip(why)
    case = make_case([2], [300], [70, 9], q_heads=32, kv_heads=8, head_dim=64, seed=6)
    _same_bits_on_1_and_4_threads(case)


def _same_bits_on_1_and_4_threads(case) -> None:
    """The C++ kernel's output on 1 and on 4 threads: equal bits, and close to the reference."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 4):
            torch.set_num_threads(count)
            results.append(_decode(case, "cpu"))
    finally:
        torch.set_num_threads(threads)
    (out_1, lse_1), (out_4, lse_4) = results
    assert torch.equal(out_1, out_4) and torch.equal(lse_1, lse_4)
    ref_out, ref_lse = reference.cascade_decode_attention(*case.args())
    assert_close(out_4, ref_out, torch.float32, "out")
    assert_close(lse_4, ref_lse, torch.float32, "lse")


def test_plan_groups_sequences_by_problem():
    problem_ids = torch.tensor([2, 0, 2, 1, 0, 2], dtype=torch.int32)
    plan = ops.plan_cascade_decode(problem_ids, 4)
    assert plan.seq_order.tolist() == [1, 4, 3, 0, 2, 5]
    assert plan.problem_starts.tolist() == [0, 2, 3, 6, 6]


# ---------------------------------------------------------------------------------------------
# paged_prefill_attention


PREFILL_LAYOUTS = [
    # (name, seqs per problem, prompt lens, suffix lens, q lens)
    ("prompt_prefill", [1, 1], [37, 16], [0, 0], [37, 16]),
    ("prompt_chunk", [1], [50], [0], [13]),
    ("new_step_on_suffix", [2, 1], [20, 33], [9, 17, 30], [9, 4, 1]),
    ("zero_new_tokens", [2], [18], [5, 6], [0, 6]),
    ("into_the_prompt", [1], [24], [3], [10]),
]


@pytest.mark.parametrize("backend,device", backend_params("paged_prefill_attention"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,seqs,prompts,suffixes,q_lens", PREFILL_LAYOUTS, ids=[x[0] for x in PREFILL_LAYOUTS])
def test_prefill_matches_reference(backend, device, dtype, name, seqs, prompts, suffixes, q_lens):
    case = make_case(seqs, prompts, suffixes, q_rows=sum(q_lens), dtype=dtype, device=device,
                     seed=len(name), interleave=False)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32, device=device)
    out, lse = ops.paged_prefill_attention(*case.args(), q_lens_t, backend=backend)
    ref_out, ref_lse = reference.paged_prefill_attention(*case.args(), q_lens_t)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("backend,device", backend_params("paged_prefill_attention"))
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(8, 1, 128), (4, 4, 40)])
def test_prefill_gqa_and_head_dims(backend, device, q_heads, kv_heads, head_dim):
    q_lens = [12, 3]
    case = make_case([1, 1], [19, 8], [4, 3], q_rows=sum(q_lens), q_heads=q_heads, kv_heads=kv_heads,
                     head_dim=head_dim, device=device, seed=head_dim, interleave=False)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32, device=device)
    out, lse = ops.paged_prefill_attention(*case.args(), q_lens_t, backend=backend)
    ref_out, ref_lse = reference.paged_prefill_attention(*case.args(), q_lens_t)
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")


@pytest.mark.parametrize("backend,device", backend_params("paged_prefill_attention"))
def test_prefill_last_token_equals_decode(backend, device):
    """A one-token chunk is a decode step: the two ops agree."""
    case = make_case([2, 1], [25, 40], [6, 11, 1], device=device, seed=3)
    q_lens = torch.ones(3, dtype=torch.int32, device=device)
    out, lse = ops.paged_prefill_attention(*case.args(), q_lens, backend=backend)
    dec_out, dec_lse = reference.cascade_decode_attention(*case.args())
    assert_close(out, dec_out, torch.float32, "out")
    assert_close(lse, dec_lse, torch.float32, "lse")


# ---------------------------------------------------------------------------------------------
# merge_attention_states


def _states(rows, heads, dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen)
    return (make(rows, heads, dim).to(device, dtype), (make(rows, heads) * 3).to(device),
            make(rows, heads, dim).to(device, dtype), (make(rows, heads) * 3).to(device))


@pytest.mark.parametrize("backend,device", backend_params("merge_attention_states"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_matches_reference(backend, device, dtype):
    o_a, lse_a, o_b, lse_b = _states(37, 4, 64, dtype, device, seed=1)
    out, lse = ops.merge_attention_states(o_a, lse_a, o_b, lse_b, backend=backend)
    ref_out, ref_lse = reference.merge_attention_states(o_a, lse_a, o_b, lse_b)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("backend,device", backend_params("merge_attention_states"))
def test_merge_with_empty_level_returns_other_exactly(backend, device):
    o_a, lse_a, o_b, lse_b = _states(9, 2, 64, torch.float32, device, seed=2)
    lse_b[::2] = float("-inf")
    o_b[::2] = float("nan")  # an empty level's output must not leak in, even as NaN
    lse_b[1, 0] = float("-inf")
    o_b[1, 0] = 0.0
    lse_a[3] = float("-inf")
    lse_b[3] = float("-inf")  # both empty
    out, lse = ops.merge_attention_states(o_a, lse_a, o_b, lse_b, backend=backend)
    assert torch.equal(out[::2][[0, 2, 4]], o_a[::2][[0, 2, 4]])
    assert torch.equal(lse[::2][[0, 2, 4]], lse_a[::2][[0, 2, 4]])
    assert torch.equal(out[1, 0], o_a[1, 0])
    assert torch.all(out[3] == 0) and torch.all(lse[3] == float("-inf"))
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("backend,device", backend_params("merge_attention_states"))
def test_merging_two_levels_equals_attending_both(backend, device):
    case = make_case([2, 2], [30, 17], [12, 0, 5, 21], device=device, seed=8)
    empty_suffix = torch.zeros_like(case.suffix_lens)
    o_prompt, lse_prompt = reference.cascade_decode_attention(
        case.q, case.k_cache, case.v_cache, case.prompt_block_tables, case.prompt_lens,
        case.problem_ids, case.suffix_block_tables, empty_suffix)
    no_prompt = torch.zeros_like(case.prompt_lens)
    o_suffix, lse_suffix = reference.cascade_decode_attention(
        case.q, case.k_cache, case.v_cache, case.prompt_block_tables, no_prompt,
        case.problem_ids, case.suffix_block_tables, case.suffix_lens)
    out, lse = ops.merge_attention_states(o_prompt, lse_prompt, o_suffix, lse_suffix, backend=backend)
    ref_out, ref_lse = reference.cascade_decode_attention(*case.args())
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")


# ---------------------------------------------------------------------------------------------
# write_kv


@pytest.mark.parametrize("backend,device", backend_params("write_kv"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
def test_write_kv_matches_reference(backend, device, dtype, slot_dtype):
    gen = torch.Generator().manual_seed(4)
    num_blocks, block_size, kv_heads, dim = 6, 16, 2, 64
    cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(device, dtype)
    k = torch.randn(20, kv_heads, dim, generator=gen).to(device, dtype)
    v = torch.randn(20, kv_heads, dim, generator=gen).to(device, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:20]
    slots[[3, 11]] = -1  # padded rows
    slots = slots.to(device, slot_dtype)
    k_cache, v_cache = cache.clone(), cache.clone() * 2
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ops.write_kv(k_cache, v_cache, k, v, slots, backend=backend)
    reference.write_kv(ref_k, ref_v, k, v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
