"""cascade_decode_attention on the GPU backends against the reference (skipped without CUDA).

tests/test_attention.py runs every backend on small float32/float16 cases. These add what only a
GPU runs: bfloat16, the head layouts of real models with up to 256 sequences and 2048-token
prompts, levels long enough that the CUDA kernel splits them across CTAs, more problems than a
warp has lanes, and replay inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from paged import assert_close, backend_params, make_case

from ttscale import ops, reference

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [p for p in backend_params("cascade_decode_attention") if p.values[0] != "cpu"]
HALF = [torch.float16, torch.bfloat16]

# (name, query heads, kv heads, head dim)
MODELS = [("llama3.2-1b", 32, 8, 64), ("qwen2.5-0.5b", 14, 2, 64), ("llama3.1-8b", 32, 8, 128)]


def _assert_matches_reference(case, backend, dtype, **kw):
    out, lse = ops.cascade_decode_attention(*case.args(), backend=backend, **kw)
    ref_out, ref_lse = reference.cascade_decode_attention(*case.args(), scale=kw.get("scale"))
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


LAYOUTS = [
    # (name, seqs per problem, prompt lengths, suffix lengths or None for random)
    ("one_sequence", [1], [37], [5]),
    ("many_problems_uneven", [3, 1, 5], [16, 50, 3], None),
    ("empty_suffixes", [2, 2], [33, 20], [0, 0, 0, 0]),
    ("empty_prompt", [3], [0], [7, 0, 19]),
    ("all_empty", [2], [0], [0, 0]),
    ("prompt_not_tile_multiple", [4], [131], [1, 16, 17, 31]),
]


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name,seqs,prompts,suffixes", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_half_precision_layouts(backend, device, dtype, name, seqs, prompts, suffixes):
    case = make_case(seqs, prompts, suffixes, dtype=dtype, device=device, seed=len(name))
    _assert_matches_reference(case, backend, dtype)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    "q_heads,kv_heads", [(4, 4), (8, 2), (8, 1), (40, 2)], ids=["mha", "gqa4", "gqa8", "gqa20"]
)
@pytest.mark.parametrize("head_dim", [64, 128, 40, 256])
def test_half_precision_gqa_and_head_dims(backend, device, dtype, q_heads, kv_heads, head_dim):
    case = make_case([2, 3], [90, 40], q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                     dtype=dtype, device=device, seed=q_heads * 1000 + head_dim)
    _assert_matches_reference(case, backend, dtype)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name,q_heads,kv_heads,head_dim", MODELS, ids=[m[0] for m in MODELS])
def test_model_heads_256_sequences_of_one_long_prompt(backend, device, dtype, name, q_heads,
                                                      kv_heads, head_dim):
    case = make_case([256], [2048], [64] * 256, q_heads=q_heads, kv_heads=kv_heads,
                     head_dim=head_dim, dtype=dtype, device=device, seed=head_dim + q_heads)
    _assert_matches_reference(case, backend, dtype)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name,q_heads,kv_heads,head_dim", MODELS, ids=[m[0] for m in MODELS])
def test_model_heads_problems_of_different_sizes(backend, device, dtype, name, q_heads, kv_heads,
                                                 head_dim):
    seqs = [1, 7, 64, 120, 64]
    gen = torch.Generator().manual_seed(head_dim)
    suffixes = torch.randint(0, 200, (sum(seqs),), generator=gen).tolist()
    case = make_case(seqs, [2048, 100, 513, 1000, 0], suffixes, q_heads=q_heads,
                     kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device=device, seed=7)
    _assert_matches_reference(case, backend, dtype)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    "seqs,prompts,suffixes", [([1], [4000], [1500]), ([1, 1], [3000, 17], [5, 2100])],
    ids=["one_sequence", "two_problems"],
)
def test_long_levels_of_few_sequences(backend, device, dtype, seqs, prompts, suffixes):
    """Few rows and long levels: the CUDA kernel splits the keys of both levels across CTAs."""
    case = make_case(seqs, prompts, suffixes, q_heads=8, kv_heads=2, dtype=dtype, device=device,
                     seed=3)
    _assert_matches_reference(case, backend, dtype)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_more_problems_than_a_warp_has_lanes(backend, device):
    gen = torch.Generator().manual_seed(70)
    seqs = torch.randint(0, 4, (70,), generator=gen).tolist()
    seqs[0] = max(seqs[0], 1)
    prompts = torch.randint(0, 300, (70,), generator=gen).tolist()
    case = make_case(seqs, prompts, q_heads=8, kv_heads=2, dtype=torch.float16, device=device,
                     seed=70)
    _assert_matches_reference(case, backend, torch.float16)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("block_size", [8, 128])
def test_block_sizes_with_head_dim_128(backend, device, block_size):
    case = make_case([3, 2], [300, 9], block_size=block_size, head_dim=128, dtype=torch.bfloat16,
                     device=device, seed=block_size)
    _assert_matches_reference(case, backend, torch.bfloat16, scale=0.05)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_replay_in_a_cuda_graph(backend, device):
    """Launch sizes depend only on shapes: a captured step replays correctly on new queries."""
    case = make_case([5, 3], [300, 70], [40, 0, 7, 90, 16, 1, 33, 64], dtype=torch.float16,
                     device=device, seed=9)
    plan = ops.plan_cascade_decode(case.problem_ids, case.prompt_lens.shape[0])
    ops.cascade_decode_attention(*case.args(), plan=plan, backend=backend)  # load kernels first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ops.cascade_decode_attention(*case.args(), plan=plan, backend=backend)
    case.q.copy_(torch.randn(case.q.shape, generator=torch.Generator().manual_seed(1)).to(case.q))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = reference.cascade_decode_attention(*case.args())
    assert_close(out, ref_out, torch.float16, "out")
    assert_close(lse, ref_lse, torch.float16, "lse")
