"""The Triton decode kernel's tiling edges, forced with small launch shapes, against the reference.

tests/test_attention.py covers the Triton ops with the automatic launch shape; here level-0 tiles
straddle problems, one problem spans several tiles, and prompts are split into key ranges
whose edges fall inside, on and past the prompt's end.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from paged import assert_close, make_case, missing_feature

from ttscale import ops, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if (why := missing_feature("triton", DEVICE)) is not None:
    pytest.skip(why, allow_module_level=True)
# With a GPU every test here runs on it, so `-m gpu` (bench/gpu.sh) selects them all; the GPU
# report counts them under the decode op unless a test names another.
pytestmark = [pytest.mark.op("cascade_decode_attention")] + (
    [pytest.mark.gpu] if DEVICE == "cuda" else [])

from ttscale.kernels.cascade_decode import DecodeConfig, cascade_decode_attention, decode_config  # noqa: E402


@pytest.fixture(params=[False, True], ids=["two_launches", "overlapped"])
def overlap(request):
    """Both launch orders: level 0 then level 1 with the merge, or both levels side by side."""
    return request.param


def _run(case, config, overlap=False):
    plan = ops.plan_cascade_decode(case.problem_ids, case.prompt_lens.shape[0])
    config = dataclasses.replace(config, overlap=overlap)
    return cascade_decode_attention(*case.args(), case.q.shape[-1] ** -0.5, plan.tensors(), config)


def _assert_matches_reference(case, out, lse, dtype=torch.float32):
    ref_out, ref_lse = reference.cascade_decode_attention(*case.args())
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


def test_tiles_straddling_problem_boundaries(overlap):
    # 4 query heads per kv head: 16-row tiles hold 4 sequences, and problems of 5, 3, 7 ... cut
    # them mid-tile; problem 1 has no sequences and problem 4 no prompt.
    case = make_case([5, 0, 3, 7, 1, 2], [20, 9, 33, 16, 0, 41], q_heads=8, kv_heads=2,
                     device=DEVICE, seed=21)
    config = DecodeConfig(block_m=16, block_n=16, num_splits=1, suffix_block_n=16)
    out, lse = _run(case, config, overlap)
    _assert_matches_reference(case, out, lse)


def test_problem_with_more_sequences_than_a_tile(overlap):
    case = make_case([37, 2], [26, 5], q_heads=2, kv_heads=2, device=DEVICE, seed=22)
    config = DecodeConfig(block_m=16, block_n=16, num_splits=1, suffix_block_n=16)
    out, lse = _run(case, config, overlap)
    _assert_matches_reference(case, out, lse)


@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_prompt_split_edges(num_splits, overlap):
    # Prompt lengths below, on and just past the 16-key block edges of the splits; with 8
    # splits the short prompts leave most splits empty.
    prompts = [0, 1, 16, 47, 48, 49, 130]
    case = make_case([1, 2, 1, 1, 2, 1, 2], prompts, q_heads=4, kv_heads=2, device=DEVICE, seed=23)
    config = DecodeConfig(block_m=16, block_n=16, num_splits=num_splits, suffix_block_n=16)
    out, lse = _run(case, config, overlap)
    _assert_matches_reference(case, out, lse)


def test_split_prompt_with_fp16(overlap):
    case = make_case([3, 2], [90, 33], dtype=torch.float16, device=DEVICE, seed=24)
    config = DecodeConfig(block_m=16, block_n=16, num_splits=4, suffix_block_n=16)
    out, lse = _run(case, config, overlap)
    _assert_matches_reference(case, out, lse, torch.float16)


SPLIT = DecodeConfig(block_m=16, block_n=16, num_splits=3, suffix_block_n=16)


@pytest.mark.parametrize("q_heads", [2, 16], ids=["group1", "group8"])
def test_single_sequence_split_prompt(q_heads, overlap):
    # N=1: one sequence's rows fill a fraction of a tile; its 100-key prompt is cut in 3 ranges.
    case = make_case([1], [100], [23], q_heads=q_heads, kv_heads=2, device=DEVICE, seed=29)
    out, lse = _run(case, SPLIT, overlap)
    _assert_matches_reference(case, out, lse)


@pytest.mark.parametrize("q_heads", [2, 16], ids=["group1", "group8"])
def test_prompts_shorter_than_a_block(q_heads, overlap):
    # 1, 5 and 15 keys of a 16-key pool block: the one tile step and split are mostly masked.
    case = make_case([2, 3, 1], [1, 5, 15], q_heads=q_heads, kv_heads=2, device=DEVICE, seed=30)
    out, lse = _run(case, SPLIT, overlap)
    _assert_matches_reference(case, out, lse)


@pytest.mark.parametrize("q_heads", [2, 16], ids=["group1", "group8"])
def test_empty_suffixes_equal_prompt_only(q_heads, overlap):
    # Every suffix empty: the output is the prompt level alone, merged from its splits.
    case = make_case([3, 2], [70, 40], [0] * 5, q_heads=q_heads, kv_heads=2, device=DEVICE,
                     seed=31)
    out, lse = _run(case, SPLIT, overlap)
    _assert_matches_reference(case, out, lse)


@pytest.mark.parametrize("q_heads", [2, 16], ids=["group1", "group8"])
def test_automatic_launch_shape_on_odd_shapes(q_heads):
    # Through the public op: N=1 beside a problem of 6, a 3-key prompt, empty suffixes.
    case = make_case([1, 6, 2], [300, 3, 17], [0, 5, 16, 31, 0, 1, 9, 0, 2], q_heads=q_heads,
                     kv_heads=2, device=DEVICE, seed=32)
    out, lse = ops.cascade_decode_attention(*case.args(), backend="triton")
    _assert_matches_reference(case, out, lse)


def test_prompt_splits_fill_an_h100_once(monkeypatch):
    # Llama-3.2-1B heads, 256 samples of one problem, prompt 2048: 128-row tiles of 32
    # sequences, 64 tiles over 8 kv heads, so 3 key ranges give the 132 multiprocessors one
    # program each (a fourth would only add partial states).
    from ttscale.kernels import cascade_decode

    monkeypatch.setattr(cascade_decode, "_multiprocessors", lambda device: 132)
    config = decode_config(256, 32, 8, 1, 2048, 64, torch.device("cuda"))
    assert (config.block_m, config.num_splits) == (128, 3)
    # Enough tiles already: no split; a short prompt: no split below 256 keys.
    assert decode_config(1024, 32, 8, 1, 2048, 64, torch.device("cuda")).num_splits == 1
    assert decode_config(64, 32, 8, 1, 300, 64, torch.device("cuda")).num_splits == 1
    # Few tiles, long prompt: up to 16 ranges of at least 256 keys.
    assert decode_config(16, 32, 8, 1, 8192, 64, torch.device("cuda")).num_splits == 16
    assert decode_config(16, 32, 8, 1, 1024, 64, torch.device("cuda")).num_splits == 4


# ---------------------------------------------------------------------------------------------
# bf16 on the GPU (the interpreter's bf16 tl.dot is wrong, TOOLCHAIN.md)


@pytest.mark.gpu
def test_decode_bf16():
    case = make_case([5, 1, 3], [300, 17, 64], q_heads=32, kv_heads=8, dtype=torch.bfloat16,
                     device=DEVICE, seed=25)
    out, lse = ops.cascade_decode_attention(*case.args(), backend="triton")
    _assert_matches_reference(case, out, lse, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("q_heads", [2, 16], ids=["group1", "group8"])
def test_decode_bf16_odd_shapes(q_heads, overlap):
    # N=1, a prompt shorter than a block, empty suffixes, a prompt split in 3, in bf16.
    case = make_case([1, 4, 2], [100, 5, 0], [0, 17, 0, 3, 64, 0, 1], q_heads=q_heads,
                     kv_heads=2, dtype=torch.bfloat16, device=DEVICE, seed=33)
    out, lse = _run(case, SPLIT, overlap)
    _assert_matches_reference(case, out, lse, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_decode_bf16_split_prompt(head_dim, overlap):
    case = make_case([40, 3], [700, 260], q_heads=8, kv_heads=2, head_dim=head_dim,
                     dtype=torch.bfloat16, device=DEVICE, seed=head_dim)
    config = DecodeConfig(block_m=64, block_n=64, num_splits=4, suffix_block_n=32)
    out, lse = _run(case, config, overlap)
    _assert_matches_reference(case, out, lse, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.op("paged_prefill_attention")
def test_prefill_bf16():
    q_lens = [37, 9, 1]
    case = make_case([1, 2], [37, 20], [0, 9, 30], q_rows=sum(q_lens), q_heads=8, kv_heads=2,
                     dtype=torch.bfloat16, device=DEVICE, seed=26, interleave=False)
    lens = torch.tensor(q_lens, dtype=torch.int32, device=DEVICE)
    out, lse = ops.paged_prefill_attention(*case.args(), lens, backend="triton")
    ref_out, ref_lse = reference.paged_prefill_attention(*case.args(), lens)
    assert_close(out, ref_out, torch.bfloat16, "out")
    assert_close(lse, ref_lse, torch.bfloat16, "lse")


@pytest.mark.gpu
@pytest.mark.op("merge_attention_states")
def test_merge_bf16():
    gen = torch.Generator().manual_seed(27)
    o_a, o_b = (torch.randn(21, 4, 64, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    lse_a, lse_b = (torch.randn(21, 4, generator=gen).to(DEVICE) for _ in range(2))
    lse_b[::3] = float("-inf")
    out, lse = ops.merge_attention_states(o_a, lse_a, o_b, lse_b, backend="triton")
    ref_out, ref_lse = reference.merge_attention_states(o_a, lse_a, o_b, lse_b)
    assert_close(out, ref_out, torch.bfloat16, "out")
    assert_close(lse, ref_lse, torch.bfloat16, "lse")


@pytest.mark.gpu
@pytest.mark.op("write_kv")
def test_write_kv_bf16():
    gen = torch.Generator().manual_seed(28)
    cache = torch.randn(4, 16, 2, 64, generator=gen).to(DEVICE, torch.bfloat16)
    k, v = (torch.randn(9, 2, 64, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    slots = torch.tensor([5, -1, 63, 0, 17, 40, -1, 2, 33], device=DEVICE)
    got_k, got_v, ref_k, ref_v = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    ops.write_kv(got_k, got_v, k, v, slots, backend="triton")
    reference.write_kv(ref_k, ref_v, k, v, slots)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_selfcheck_decode_covers_the_split_prompt(dtype):
    # `ttscale selfcheck` runs this check per backend and dtype; for Triton it includes a prompt
    # split across programs with GQA group 8.
    from ttscale import selfcheck

    assert selfcheck._check_decode(DEVICE, "triton", dtype, seed=34) <= selfcheck.TOLERANCE[dtype]
