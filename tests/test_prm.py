"""prm_step_scores on every available backend against the plain-torch reference."""

from __future__ import annotations

import pytest
import torch
from paged import assert_close, backend_params

from ttscale import ops, reference
from ttscale.ops.prm_step_scores import _prm_step_scores
from ttscale.testing import make_prm_case

KINDS = ["two_token", "two_class", "value"]
AGGS = ["last", "min", "prod", "mean"]
# The kernels accumulate in float32 from exactly widened inputs, so every dtype meets the
# float32 tolerance against the float32 reference.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = backend_params("prm_step_scores")


def _check(got, expected, what):
    assert got.dtype == torch.float32
    assert_close(got, expected, torch.float32, what)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(backend, device, kind, agg, dtype):
    case = make_prm_case(29, 100, 6, kind=kind, dtype=dtype, device=device,
                         seed=KINDS.index(kind) * 10 + AGGS.index(agg))
    scores, state = ops.prm_step_scores(*case.args(), kind, agg, case.state, backend=backend)
    ref_scores, ref_state = reference.prm_step_scores(*case.args(), kind, agg, case.state)
    _check(scores, ref_scores, "scores")
    _check(state, ref_state, "state")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("hidden_size", [1, 16, 17, 1000])
@pytest.mark.parametrize("kind", KINDS)
def test_hidden_sizes(backend, device, kind, hidden_size):
    case = make_prm_case(9, hidden_size, 3, kind=kind, device=device, seed=hidden_size)
    scores, state = ops.prm_step_scores(*case.args(), kind, "mean", case.state, backend=backend)
    ref_scores, ref_state = reference.prm_step_scores(*case.args(), kind, "mean", case.state)
    _check(scores, ref_scores, "scores")
    _check(state, ref_state, "state")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["two_class", "value"])
def test_without_bias_matches_reference(backend, device, kind):
    case = make_prm_case(11, 64, 4, kind=kind, with_bias=False, device=device, seed=5)
    scores, state = ops.prm_step_scores(*case.args(), kind, "prod", case.state, backend=backend)
    ref_scores, ref_state = reference.prm_step_scores(*case.args(), kind, "prod", case.state)
    _check(scores, ref_scores, "scores")
    _check(state, ref_state, "state")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_several_calls_equal_one_call(backend, device, agg):
    case = make_prm_case(40, 48, 5, device=device, seed=AGGS.index(agg))
    one_scores, one_state = ops.prm_step_scores(*case.args(), "two_token", agg, case.state,
                                                backend=backend)
    state, parts = case.state, []
    for rows in (slice(0, 7), slice(7, 8), slice(8, 8), slice(8, 40)):
        scores, state = ops.prm_step_scores(case.hidden[rows], case.seq_ids[rows], case.weight,
                                            None, "two_token", agg, state, backend=backend)
        parts.append(scores)
    _check(torch.cat(parts), one_scores, "scores")
    _check(state, one_state, "state")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_fork_then_continue_equals_concatenated_path(backend, device, agg):
    # Three beams score two steps each; four children fork from beams 2, 0, 2, 1 and score one
    # or two more. Each child's aggregate equals scoring its whole path (parent's steps, then its
    # own) as one sequence.
    gen = torch.Generator().manual_seed(AGGS.index(agg))
    hidden_size = 40
    weight = (torch.randn(2, hidden_size, generator=gen) / 3).to(device)
    past = torch.randn(6, hidden_size, generator=gen).to(device)
    past_ids = torch.tensor([0, 1, 2, 2, 1, 0], device=device)
    new = torch.randn(6, hidden_size, generator=gen).to(device)
    new_ids = torch.tensor([0, 3, 1, 2, 3, 0], device=device)
    parents = torch.tensor([2, 0, 2, 1], device=device)

    _, state = ops.prm_step_scores(past, past_ids, weight, agg=agg, num_seqs=3, backend=backend)
    _, state = ops.prm_step_scores(new, new_ids, weight, agg=agg, state=state[parents],
                                   backend=backend)

    for child, parent in enumerate(parents.tolist()):
        path = torch.cat([past[past_ids == parent], new[new_ids == child]])
        _, expected = reference.prm_step_scores(path, torch.zeros(len(path), dtype=torch.long,
                                                device=device), weight, agg=agg)
        _check(state[child], expected[0], f"child {child}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_two_token_equals_full_vocab_softmax(backend, device):
    gen = torch.Generator().manual_seed(7)
    steps, hidden_size, vocab, plus_id, minus_id = 25, 64, 5000, 1234, 877
    hidden = torch.randn(steps, hidden_size, generator=gen).to(device)
    lm_head = (torch.randn(vocab, hidden_size, generator=gen) / 4).to(device)
    seq_ids = torch.arange(steps, device=device) % 4
    scores, _ = ops.prm_step_scores(hidden, seq_ids, lm_head[[plus_id, minus_id]],
                                    backend=backend)
    expected = reference.two_token_from_full_vocab(hidden, lm_head, plus_id, minus_id)
    _check(scores, expected, "scores")


def _bytes_allocated_by_torch(fn) -> int:
    """Total bytes torch allocates on the CPU while ``fn`` runs (an upper bound on its peak)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    return sum(max(e.cpu_memory_usage, 0) for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fused_path_never_allocates_logits_over_the_vocabulary(backend):
    # The op receives only the two lm_head rows, so V cannot reach it: every tensor it allocates
    # is sized by T, H or S. The unfused path, measured the same way, allocates [T, V] logits and
    # probabilities; the fused one allocates less than one vocabulary row per step.
    gen = torch.Generator().manual_seed(3)
    steps, hidden_size, vocab = 32, 64, 50_000
    hidden = torch.randn(steps, hidden_size, generator=gen)
    lm_head = torch.randn(vocab, hidden_size, generator=gen)
    two_rows = lm_head[[5, 9]]
    seq_ids = torch.arange(steps) % 8
    logits_bytes = steps * vocab * 4

    fused = _bytes_allocated_by_torch(
        lambda: ops.prm_step_scores(hidden, seq_ids, two_rows, num_seqs=8, backend=backend))
    unfused = _bytes_allocated_by_torch(
        lambda: reference.two_token_from_full_vocab(hidden, lm_head, 5, 9))
    assert unfused >= logits_bytes, "the measurement misses the unfused path's [T, V] logits"
    assert fused < logits_bytes / 100, f"fused path allocated {fused} bytes"


@pytest.mark.gpu
def test_fused_path_never_allocates_logits_on_the_gpu():
    steps, hidden_size, vocab = 256, 1024, 128_256
    hidden = torch.randn(steps, hidden_size, device="cuda", dtype=torch.bfloat16)
    two_rows = torch.randn(2, hidden_size, device="cuda", dtype=torch.bfloat16)
    seq_ids = torch.arange(steps, device="cuda") % 64
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ops.prm_step_scores(hidden, seq_ids, two_rows, num_seqs=64)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < steps * vocab * 2 / 100


@pytest.mark.gpu
def test_gpu_path_never_synchronises_with_the_host():
    case = make_prm_case(300, 256, 40, dtype=torch.bfloat16, device="cuda", seed=11)
    ops.prm_step_scores(*case.args(), "two_token", "min", case.state)  # compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.prm_step_scores(*case.args(), "two_token", "min", case.state)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_captures_in_a_cuda_graph_and_replays_on_new_inputs():
    case = make_prm_case(300, 256, 40, dtype=torch.bfloat16, device="cuda", seed=12)
    args = (*case.args(), "two_token", "mean", case.state)
    ops.prm_step_scores(*args)  # compile before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scores, state = ops.prm_step_scores(*args)
    case.hidden.copy_(torch.randn_like(case.hidden))
    case.state[:, 1] = 0.0
    graph.replay()
    ref_scores, ref_state = reference.prm_step_scores(*args)
    _check(scores, ref_scores, "scores")
    _check(state, ref_state, "state")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_new_sequences_start_empty(backend, device, agg):
    case = make_prm_case(10, 32, 4, device=device, seed=1)
    ids = torch.tensor([0, 0, 2, 0, 2, 2, 0, 2, 2, 0], device=device)
    scores, state = ops.prm_step_scores(case.hidden, ids, case.weight, agg=agg, num_seqs=4,
                                        backend=backend)
    empty = reference.PRM_EMPTY_AGGREGATE[agg]
    assert state[:, 1].tolist() == [5.0, 0.0, 5.0, 0.0]
    assert state[1, 0].item() == empty and state[3, 0].item() == empty
    _check(state, reference.prm_step_scores(case.hidden, ids, case.weight, agg=agg,
                                            state=reference.prm_empty_state(4, agg, device))[1],
           "state")


@pytest.mark.parametrize("agg", AGGS)
def test_empty_state_values(agg):
    state = ops.prm_empty_state(3, agg)
    assert state.dtype == torch.float32 and state.shape == (3, 2)
    assert state[:, 0].tolist() == [reference.PRM_EMPTY_AGGREGATE[agg]] * 3
    assert state[:, 1].tolist() == [0.0] * 3


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_zero_steps_returns_the_state_unchanged(backend, device, agg):
    case = make_prm_case(0, 32, 4, device=device, seed=2)
    scores, state = ops.prm_step_scores(*case.args(), "two_token", agg, case.state, backend=backend)
    assert scores.shape == (0,) and scores.dtype == torch.float32
    assert torch.equal(state, case.state)
    assert state.data_ptr() != case.state.data_ptr()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_steps_and_no_state_gives_no_sequences(backend, device):
    case = make_prm_case(0, 32, 0, device=device)
    scores, state = ops.prm_step_scores(case.hidden, case.seq_ids, case.weight, backend=backend)
    assert scores.shape == (0,) and state.shape == (0, 2)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_state_none_has_max_seq_id_plus_one_rows(backend, device):
    case = make_prm_case(6, 32, 1, device=device)
    ids = torch.tensor([4, 1, 1, 0, 4, 4], device=device)
    _, state = ops.prm_step_scores(case.hidden, ids, case.weight, backend=backend)
    assert state.shape == (5, 2)
    assert state[:, 1].tolist() == [1.0, 2.0, 0.0, 0.0, 3.0]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_count_zero_row_is_empty_whatever_its_aggregate(backend, device, agg):
    case = make_prm_case(5, 32, 2, device=device, seed=4)
    ids = torch.zeros(5, dtype=torch.long, device=device)
    garbage = torch.tensor([[123.0, 0.0], [-5.0, 0.0]], device=device)
    _, got = ops.prm_step_scores(case.hidden, ids, case.weight, agg=agg, state=garbage,
                                 backend=backend)
    _, fresh = ops.prm_step_scores(case.hidden, ids, case.weight, agg=agg, num_seqs=2,
                                   backend=backend)
    _check(got[0], fresh[0], "stepped row")
    assert got[1].tolist() == [-5.0, 0.0], "a row without steps is returned as it was"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_last_is_the_final_step_of_each_sequence(backend, device):
    case = make_prm_case(8, 32, 1, device=device, seed=6)
    ids = torch.tensor([1, 0, 1, 1, 0, 2, 1, 2], device=device)
    scores, state = ops.prm_step_scores(case.hidden, ids, case.weight, agg="last", backend=backend)
    assert state[:, 0].tolist() == [scores[4].item(), scores[6].item(), scores[7].item()]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_input_state_is_not_modified(backend, device):
    case = make_prm_case(12, 32, 3, device=device, seed=8)
    before = case.state.clone()
    ops.prm_step_scores(*case.args(), "two_token", "mean", case.state, backend=backend)
    assert torch.equal(case.state, before)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32],
                         ids=str)
def test_any_integer_seq_ids(backend, device, index_dtype):
    case = make_prm_case(12, 32, 3, device=device, seed=9)
    expected = ops.prm_step_scores(*case.args(), "two_token", "min", case.state, backend=backend)
    got = ops.prm_step_scores(case.hidden, case.seq_ids.to(index_dtype), case.weight,
                              agg="min", state=case.state, backend=backend)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_inputs(backend, device):
    case = make_prm_case(10, 64, 3, kind="value", device=device, seed=10)
    hidden = case.hidden.T.contiguous().T  # column-major: the same values, not contiguous
    scores, state = ops.prm_step_scores(hidden, case.seq_ids[:, None].expand(10, 2)[:, 0],
                                        case.weight, case.bias, "value", "mean", case.state,
                                        backend=backend)
    ref_scores, ref_state = reference.prm_step_scores(*case.args(), "value", "mean", case.state)
    _check(scores, ref_scores, "scores")
    _check(state, ref_state, "state")


def test_custom_op_registration():
    case = make_prm_case(7, 32, 3, kind="two_class")
    seq_ids = case.seq_ids.to(torch.int64)
    torch.library.opcheck(_prm_step_scores, (case.hidden, seq_ids, case.weight, case.bias,
                                                 "two_class", "mean", case.state, "cpu"))


def test_runs_under_torch_compile():
    case = make_prm_case(7, 32, 3)
    compiled = torch.compile(lambda h, i, w, s: ops.prm_step_scores(h, i, w, agg="prod", state=s),
                             backend="eager")
    scores, state = compiled(case.hidden, case.seq_ids, case.weight, case.state)
    ref_scores, ref_state = reference.prm_step_scores(*case.args(), "two_token", "prod", case.state)
    _check(scores, ref_scores, "scores")
    _check(state, ref_state, "state")
