"""Bad input to the attention ops raises ValueError naming the argument, never a crash."""

from __future__ import annotations

import pytest
import torch
from paged import make_case

from ttscale import backends, ops


@pytest.fixture
def case():
    return make_case([2, 1], [20, 9], [3, 4, 0], seed=1)


def decode(case, **changes):
    args = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache,
                prompt_block_tables=case.prompt_block_tables, prompt_lens=case.prompt_lens,
                problem_ids=case.problem_ids, suffix_block_tables=case.suffix_block_tables,
                suffix_lens=case.suffix_lens)
    args.update(changes)
    return ops.cascade_decode_attention(**args)


def test_q_not_a_tensor(case):
    with pytest.raises(ValueError, match="q: expected a torch.Tensor"):
        decode(case, q=[1.0])


def test_q_integer_dtype(case):
    with pytest.raises(ValueError, match="q: expected dtype"):
        decode(case, q=case.q.to(torch.int32))


def test_cache_dtype_mismatch(case):
    with pytest.raises(ValueError, match="k_cache: expected dtype float32, got float16"):
        decode(case, k_cache=case.k_cache.half())


def test_v_cache_shape_mismatch(case):
    with pytest.raises(ValueError, match="v_cache: expected shape"):
        decode(case, v_cache=case.v_cache[:-1])


def test_head_dim_mismatch(case):
    with pytest.raises(ValueError, match="k_cache: expected head_dim"):
        decode(case, q=case.q[..., :32])


def test_heads_not_multiple_of_kv_heads(case):
    q = torch.randn(case.q.shape[0], 3, case.q.shape[2])
    with pytest.raises(ValueError, match=r"q: number of query heads \(3\) must be a multiple"):
        decode(case, q=q)


def test_block_size_not_power_of_two():
    bad = make_case([1], [20], [2], block_size=12)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        decode(bad)


def test_block_size_too_small():
    bad = make_case([1], [20], [2], block_size=4)
    with pytest.raises(ValueError, match="block_size must be a power of two from 8 to 128, got 4"):
        decode(bad)


def test_non_contiguous_pool(case):
    k = case.k_cache.transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="pool must be contiguous"):
        decode(case, k_cache=k, v_cache=k)


def test_index_dtype_must_be_int32(case):
    with pytest.raises(ValueError, match="problem_ids: expected dtype int32, got int64"):
        decode(case, problem_ids=case.problem_ids.long())


def test_problem_ids_length_mismatch(case):
    with pytest.raises(ValueError, match="problem_ids: expected 3 entries"):
        decode(case, problem_ids=case.problem_ids[:2])


def test_suffix_table_rows_mismatch(case):
    with pytest.raises(ValueError, match="suffix_block_tables: expected 3 rows"):
        decode(case, suffix_block_tables=case.suffix_block_tables[:1])


def test_prompt_table_rows_mismatch(case):
    with pytest.raises(ValueError, match="prompt_block_tables: expected 2 rows"):
        decode(case, prompt_block_tables=case.prompt_block_tables[:1])


def test_problem_id_out_of_range(case):
    ids = case.problem_ids.clone()
    ids[0] = 5
    with pytest.raises(ValueError, match=r"problem_ids: value 5 outside \[0, 2\)"):
        decode(case, problem_ids=ids)


def test_block_table_entry_outside_pool(case):
    table = case.prompt_block_tables.clone()
    table[0, 0] = case.k_cache.shape[0]
    with pytest.raises(ValueError, match="prompt_block_tables: value"):
        decode(case, prompt_block_tables=table)


def test_negative_block_table_entry(case):
    table = case.suffix_block_tables.clone()
    table[0, 0] = -1
    with pytest.raises(ValueError, match="suffix_block_tables: value -1"):
        decode(case, suffix_block_tables=table)


def test_length_beyond_table_capacity(case):
    lens = case.suffix_lens.clone()
    lens[1] = case.suffix_block_tables.shape[1] * 16 + 1
    with pytest.raises(ValueError, match="suffix_block_tables: row 1 needs"):
        decode(case, suffix_lens=lens)


def test_negative_length(case):
    lens = case.prompt_lens.clone()
    lens[0] = -3
    with pytest.raises(ValueError, match="prompt_lens: value -3"):
        decode(case, prompt_lens=lens)


def test_bad_scale(case):
    with pytest.raises(ValueError, match="scale: expected a positive finite number"):
        decode(case, scale=-1.0)


def test_unknown_backend(case):
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.cascade_decode_attention(*case.args(), backend="metal")


def test_backend_unavailable_for_device(case):
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run on cpu tensors"):
        ops.cascade_decode_attention(*case.args(), backend="cuda")


def test_prefill_q_lens_must_sum_to_rows(case):
    q_lens = torch.tensor([1, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="q_lens: sums to 4, but q has 3 rows"):
        ops.paged_prefill_attention(*case.args(), q_lens)


def test_prefill_more_new_tokens_than_context():
    case = make_case([2, 1], [20, 9], [3, 4, 0], q_rows=12, interleave=False)
    q_lens = torch.tensor([1, 1, 10], dtype=torch.int32)  # sequence 2 has 9 + 0 tokens
    with pytest.raises(ValueError, match="q_lens: sequence 2 has 10 new tokens but its context holds only 9"):
        ops.paged_prefill_attention(*case.args(), q_lens)


def test_prefill_q_lens_shape(case):
    with pytest.raises(ValueError, match="q_lens: expected shape"):
        ops.paged_prefill_attention(*case.args(), torch.ones(2, dtype=torch.int32))


def test_merge_shape_mismatch():
    o = torch.randn(4, 2, 8)
    lse = torch.randn(4, 2)
    with pytest.raises(ValueError, match="o_b: expected shape"):
        ops.merge_attention_states(o, lse, o[:3], lse)
    with pytest.raises(ValueError, match="lse_b: expected dtype float32"):
        ops.merge_attention_states(o, lse, o, lse.double())


def test_write_kv_slot_outside_pool():
    cache = torch.zeros(2, 8, 1, 4)
    k = torch.ones(2, 1, 4)
    with pytest.raises(ValueError, match=r"slots: value 16 outside \[-1, 16\)"):
        ops.write_kv(cache, cache.clone(), k, k, torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="slots: value -2"):
        ops.write_kv(cache, cache.clone(), k, k, torch.tensor([0, -2]))


def test_write_kv_shape_and_dtype():
    cache = torch.zeros(2, 8, 1, 4)
    with pytest.raises(ValueError, match="k: expected shape"):
        ops.write_kv(cache, cache.clone(), torch.ones(2, 2, 4), torch.ones(2, 2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="k: expected dtype float32"):
        ops.write_kv(cache, cache.clone(), torch.ones(2, 1, 4).half(), torch.ones(2, 1, 4).half(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="slots: expected dtype"):
        ops.write_kv(cache, cache.clone(), torch.ones(2, 1, 4), torch.ones(2, 1, 4), torch.tensor([0.0, 1.0]))


def test_ops_are_registered_custom_ops_with_fake_kernels(case):
    """The ops trace under torch.compile's fake tensors (what CUDA-graph capture needs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in case.args()]
        plan = ops.CascadePlan(mode.from_tensor(case.problem_ids), mode.from_tensor(case.prompt_lens))
        out, lse = torch.ops.ttscale.cascade_decode_attention(*fake, 0.125, plan.tensors(), "cpu")
    assert out.shape == case.q.shape and lse.shape == case.q.shape[:2] and lse.dtype == torch.float32


def test_torch_compile_runs_the_op(case):
    """Compiled, the call traces to the custom op (eager calls go straight to its kernel)."""
    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    fn = torch.compile(lambda *a: ops.cascade_decode_attention(*a, backend="cpu"), backend=backend)
    out, _ = fn(*case.args())
    assert "ttscale.cascade_decode_attention.default" in traced, traced
    expected, _ = ops.cascade_decode_attention(*case.args(), backend="torch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_forced_backend_env_is_validated():
    assert backends.resolve("write_kv", torch.device("cpu"), "torch") == "torch"
