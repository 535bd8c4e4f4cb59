"""select_and_fork and copy_blocks on every available backend against the plain-Python model."""

from __future__ import annotations

import pytest
import torch
from forks import assert_pool_invariants, assert_same_fork, fork_both, used_blocks
from paged import backend_params
from ttscale import ops, reference
from ttscale.block_pool import POOL_EXHAUSTED, BlockPool
from ttscale.testing import ForkCase, make_fork_case

NAN, INF = float("nan"), float("inf")
BACKENDS = backend_params("select_and_fork")

# (name, group sizes, keep, children)
LAYOUTS = [
    ("one_group", [6], 2, 3),
    ("uneven_groups_with_empty_ones", [3, 0, 1, 5, 0, 2], 2, 2),
    ("keep_exceeds_group_size", [2, 3], 5, 2),
    ("groups_of_one", [1, 1, 1], 1, 4),
    ("no_children_frees_everything_kept", [4, 2], 2, 0),
    ("keep_zero_frees_everything", [3, 3], 0, 2),
    ("one_child_each_moves_tables", [5], 3, 1),
    ("only_empty_groups", [0, 0], 2, 2),
    ("no_groups", [], 2, 2),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name,sizes,keep,children", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_matches_reference(backend, device, name, sizes, keep, children):
    case = make_fork_case(sizes, device=device, seed=len(name))
    assert_same_fork(*fork_both(case, backend, keep, children))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_block_sizes(backend, device, block_size):
    case = make_fork_case([4, 3], block_size=block_size, device=device, seed=block_size)
    assert_same_fork(*fork_both(case, backend, 2, 3))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_per_group_keep_and_children(backend, device):
    case = make_fork_case([4, 3, 5, 1], device=device, seed=3)
    keep = torch.tensor([1, 3, 0, 2], dtype=torch.int32, device=device)
    children = torch.tensor([4, 0, 2, 1], dtype=torch.int32, device=device)
    got = fork_both(case, backend, keep, children, max_keep=3, max_children=4)
    assert_same_fork(*got)
    assert got[0].num_kept.tolist() == [1, 3, 0, 1]
    assert got[0].child_offsets.tolist() == [0, 4, 4, 4, 5]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_equal_scores_keep_the_lower_indices(backend, device):
    case = make_fork_case([5, 4], device=device, scores=[0.5] * 9)
    got = fork_both(case, backend, 3, 1)
    assert_same_fork(*got)
    assert got[0].kept.tolist() == [[0, 1, 2], [5, 6, 7]]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_negative_zero_ties_with_zero(backend, device):
    case = make_fork_case([3], device=device, scores=[0.0, -0.0, 0.0])
    got = fork_both(case, backend, 3, 1)
    assert got[0].kept.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_never_wins(backend, device):
    scores = [NAN, -INF, NAN, -1e30, NAN, 2.0]
    case = make_fork_case([6], device=device, scores=scores)
    got = fork_both(case, backend, 6, 1)
    assert_same_fork(*got)
    assert got[0].kept.tolist() == [[5, 3, 1, 0, 2, 4]]  # numbers, -inf, then NaN by index


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_neg_inf_scores_are_ranked(backend, device):
    case = make_fork_case([4], device=device, scores=[-INF, -INF, 0.0, -INF])
    got = fork_both(case, backend, 3, 2)
    assert_same_fork(*got)
    assert got[0].kept.tolist() == [[2, 0, 1]]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_group_larger_than_one_sorting_chunk(backend, device):
    case = make_fork_case([70, 3], max_own_tokens=9, spare_blocks=40, device=device, seed=9)
    assert_same_fork(*fork_both(case, backend, 5, 2))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_partial_block_shared_by_lazy_forks(backend, device):
    # Candidates 0 and 1 share their partial last block, as an engine that forks lazily leaves
    # them; a third table (not a candidate) holds candidate 2's partial block too.
    case = _allocated_case([6, 6, 5, 0], [2, 1, 1], num_blocks=12, block_size=4, device=device,
                           scores=[1.0, 0.5, 2.0, 0.0])
    tables, counts = case.block_tables, case.pool.ref_counts
    case.pool.release_blocks(tables[1, 1:2].clone())
    tables[1, 1] = tables[0, 1]
    counts[tables[0, 1]] += 1
    counts[tables[2, :2].long()] += 1
    keep = torch.tensor([2, 1, 0], dtype=torch.int32, device=device)
    got, pool, expected, ref_pool = fork_both(case, backend, keep, 3, max_keep=2)
    assert_same_fork(got, pool, expected, ref_pool)
    assert int(got.child_offsets[-1]) == 9 and int(pool.status[0]) == 0
    child_tables = used_blocks(got.block_tables, got.lens, 4)[:9]
    outside = [tables[2, :2].tolist()]  # the table outside the call still holds its blocks
    assert_pool_invariants(pool, child_tables + outside, 4, got.lens.tolist()[:9] + [5],
                           private_partials=False)
    firsts = [child_tables[0][1], child_tables[3][1], child_tables[6][1]]
    assert firsts == [int(tables[0, 1])] * 2 + [int(tables[2, 1])]  # shared on, not copied


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_pool_larger_than_one_push_chunk(backend, device):
    # Blocks are shuffled over a pool of ~3,000, so the freed ones fall in several chunks of
    # the Triton kernel's push (1,024 blocks each).
    case = make_fork_case([8, 8], max_own_tokens=80, spare_blocks=3000, device=device, seed=8)
    got = fork_both(case, backend, 1, 2)
    assert_same_fork(*got)
    assert int(got[1].free_top[0]) > int(case.pool.free_top[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_children_share_full_blocks_and_copy_the_partial_one(backend, device):
    case = make_fork_case([3, 2], block_size=4, device=device, seed=12)
    got, pool, *_ = fork_both(case, backend, 2, 3)
    tables, parents = got.block_tables.tolist(), got.parents.tolist()
    pairs = dict(zip(got.copy_dst.tolist(), got.copy_src.tolist(), strict=True))
    for slot in range(int(got.child_offsets[-1])):
        parent, child = case.block_tables[parents[slot]].tolist(), tables[slot]
        length = int(case.lens[parents[slot]])
        full, partial = divmod(length, 4)
        assert child[:full] == parent[:full]
        first_child = slot == 0 or parents[slot - 1] != parents[slot]
        if partial and first_child:
            assert child[full] == parent[full]  # the first child inherits the partial block
        elif partial:
            assert pairs[child[full]] == parent[full]  # the others copy it into a fresh block
    tables = used_blocks(got.block_tables, got.lens, 4)
    assert_pool_invariants(pool, tables, 4, got.lens.tolist())


def _allocated_case(lens, group_sizes, num_blocks, block_size, device, scores=None):
    """Candidates whose blocks come from a fresh pool's allocate, one table after another."""
    pool = BlockPool.create(num_blocks, block_size, device)
    used = [-(-n // block_size) for n in lens]
    tables = torch.full((len(lens), max(used, default=0) + 1), -1, dtype=torch.int32, device=device)
    for row, n in enumerate(used):
        tables[row, :n] = pool.allocate(n)
    offsets = torch.tensor([0] + group_sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    scores = torch.tensor(scores if scores is not None else [0.0] * len(lens))
    return ForkCase(scores.to(device), offsets.to(device), tables,
                    torch.tensor(lens, dtype=torch.int32, device=device), pool)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_exhausted_free_list_is_reported_not_raised(backend, device):
    # Candidate 0 (two full blocks and a partial one) forks four children: three need a copy.
    # One block is free and candidate 1, not kept, frees another: the third copy finds none.
    case = _allocated_case([11, 4], [1, 1], num_blocks=5, block_size=4, device=device)
    got, pool, expected, ref_pool = fork_both(case, backend, torch.tensor([1, 0], dtype=torch.int32,
                                              device=device), 4, max_keep=1)
    assert_same_fork(got, pool, expected, ref_pool)
    assert int(pool.status[0]) & POOL_EXHAUSTED
    assert got.lens[:4].tolist() == [11, 11, 11, 8]  # the last child keeps its full blocks only
    assert got.copy_dst.tolist()[2] == -1 and int(pool.free_top[0]) == 0
    tables = used_blocks(got.block_tables, got.lens, 4)
    assert_pool_invariants(pool, tables, 4, got.lens.tolist())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_full_pool_without_frees_forks_whole_blocks_only(backend, device):
    case = _allocated_case([6, 7], [2], num_blocks=4, block_size=4, device=device,
                           scores=[1.0, 2.0])
    got, pool, expected, ref_pool = fork_both(case, backend, 2, 2)
    assert_same_fork(got, pool, expected, ref_pool)
    assert int(pool.status[0]) & POOL_EXHAUSTED
    assert got.lens.tolist() == [7, 4, 6, 4] and got.copy_src.tolist() == [-1, -1]
    tables = used_blocks(got.block_tables, got.lens, 4)
    assert_pool_invariants(pool, tables, 4, got.lens.tolist())


@pytest.mark.parametrize("backend,device", backend_params("copy_blocks"))
@pytest.mark.parametrize("layered", [False, True], ids=["one_layer", "layers_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_copy_blocks_matches_reference(backend, device, layered, dtype):
    gen = torch.Generator().manual_seed(7)
    shape = (3, 10, 4, 2, 8) if layered else (10, 4, 2, 8)
    k = torch.randn(shape, generator=gen).to(device, dtype)
    v = torch.randn(shape, generator=gen).to(device, dtype)
    src = torch.tensor([1, -1, 4, 2, 7], dtype=torch.int32, device=device)
    dst = torch.tensor([3, 5, -1, 9, 0], dtype=torch.int32, device=device)
    ref_k, ref_v = k.cpu().clone(), v.cpu().clone()
    ops.copy_blocks(k, v, src, dst, backend=backend)
    reference.copy_blocks(ref_k, ref_v, src.cpu(), dst.cpu())
    assert torch.equal(k.cpu(), ref_k) and torch.equal(v.cpu(), ref_v)


@pytest.mark.parametrize("backend,device", backend_params("copy_blocks"))
def test_copy_blocks_performs_the_forks_copies(backend, device):
    case = make_fork_case([2, 3], block_size=4, device=device, seed=4)
    got, *_ = fork_both(case, backend, 2, 3)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(case.pool.num_blocks, 4, 2, 8, generator=gen).to(device)
    v = torch.randn(case.pool.num_blocks, 4, 2, 8, generator=gen).to(device)
    before_k = k.clone()
    ops.copy_blocks(k, v, got.copy_src, got.copy_dst, backend=backend)
    for src, dst in zip(got.copy_src.tolist(), got.copy_dst.tolist(), strict=True):
        if src >= 0:
            assert torch.equal(k[dst], before_k[src])


@pytest.mark.parametrize("backend,device", backend_params("copy_blocks"))
def test_copy_blocks_with_no_pairs(backend, device):
    k = torch.randn(4, 8, 1, 4, device=device)
    v, before = k.clone(), k.clone()
    empty = torch.empty(0, dtype=torch.int32, device=device)
    ops.copy_blocks(k, v, empty, empty, backend=backend)
    assert torch.equal(k, before)


@pytest.mark.gpu
def test_select_and_fork_replays_in_a_cuda_graph():
    case = make_fork_case([5, 3, 0, 4], device="cuda", seed=1)
    args = (case.scores, case.group_offsets, 2, 3, case.block_tables, case.lens)
    ops.select_and_fork(*args, case.pool.clone(), backend="triton")  # compiles the kernels
    pool, start = case.pool.clone(), case.pool.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = ops.select_and_fork(*args, pool, backend="triton")
    for _ in range(2):  # each replay starts again from the same pool state
        for state, initial in zip(pool.tensors(), start.tensors(), strict=True):
            state.copy_(initial)
        graph.replay()
        torch.cuda.synchronize()
        _, _, expected, ref_pool = fork_both(case, "triton", 2, 3)
        assert_same_fork(got, pool, expected, ref_pool)


@pytest.mark.gpu
def test_select_and_fork_never_synchronises_with_the_host():
    case = make_fork_case([6, 2], device="cuda", seed=2)
    ops.select_and_fork(case.scores, case.group_offsets, 2, 2, case.block_tables, case.lens,
                        case.pool.clone(), backend="triton")
    caches = [torch.zeros(4, case.pool.num_blocks, 8, 1, 4, device="cuda") for _ in range(2)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ops.select_and_fork(case.scores, case.group_offsets, 2, 2, case.block_tables,
                                  case.lens, case.pool, backend="triton")
        ops.copy_blocks(*caches, got.copy_src, got.copy_dst, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
