"""The sample op: every backend against the reference, and the statistics of the draws.

Backends draw the same token as the reference for the same (seed, offset): they compute the
same random bits, so token equality is the test, not a distribution. The distribution itself
is tested on the C++ backend (fast enough for tens of thousands of draws), which the first test
ties to the reference and the Triton kernel token for token. Triton runs interpreted here:
its shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
from paged import assert_close, backend_params, missing_feature
from ttscale import backends, ops, reference
from ttscale.testing import make_sampling_case

BACKENDS = backend_params("sample")
STATS_BACKEND = "cpu" if "cpu" in backends.available("sample", "cpu") else "torch"


def _sample(case, backend, seed=0, num_logprobs=0):
    return ops.sample(*case.args(seed), num_logprobs, backend=backend)


def _rows(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, offsets=None, device="cpu"):
    """One logits row ``[V]`` repeated over ``len(offsets)`` draws with one setting."""
    offsets = torch.arange(64) if offsets is None else offsets
    batch = offsets.shape[0]
    full = lambda value, dtype: torch.full((batch,), value, dtype=dtype, device=device)
    return (logits.to(device).expand(batch, -1).contiguous(), full(temperature, torch.float32),
            full(top_k, torch.int32), full(top_p, torch.float32), full(min_p, torch.float32),
            offsets.to(device))


def _draw(rows, backend, seed=0):
    logits, temperature, top_k, top_p, min_p, offsets = rows
    return ops.sample(logits, temperature, top_k, top_p, min_p, seed, offsets, backend=backend)[0]


def _kept(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    x = logits.float() * (1.0 / torch.tensor(temperature))
    return reference.sampling_kept(x, top_k, top_p, min_p)


# ---------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_reference(backend, device, dtype):
    case = make_sampling_case(8, 2500, dtype=dtype, device=device, seed=int(dtype.itemsize))
    tokens, logprobs, (top_ids, top_values) = _sample(case, backend, seed=7, num_logprobs=5)
    ref_tokens, ref_logprobs, (ref_ids, ref_values) = reference.sample(*case.args(7), 5)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens.cpu(), ref_tokens.cpu())
    assert_close(logprobs, ref_logprobs, torch.float32, "logprobs")
    assert torch.equal(top_ids.cpu(), ref_ids.cpu())
    assert_close(top_values, ref_values, torch.float32, "top_logprobs")


def test_cpu_agrees_with_reference_over_many_rows():
    """Every filter path, 2000 rows: backends differ only when two kept keys or a top-p mass
    lie within float32 rounding of each other (none seen in 12,000 rows while writing this)."""
    if (why := missing_feature("cpu", "cpu")) is not None:
        pytest.skip(why)
    case = make_sampling_case(2000, 300, seed=11)
    tokens = _sample(case, "cpu", seed=3)[0]
    assert (tokens != reference.sample(*case.args(3))[0]).sum() <= 1


@pytest.mark.parametrize("vocab", [151_936, 262_144])
def test_large_vocabulary_cpu(vocab):
    if (why := missing_feature("cpu", "cpu")) is not None:
        pytest.skip(why)
    case = make_sampling_case(8, vocab, dtype=torch.bfloat16, seed=vocab)
    tokens, logprobs, (top_ids, _) = _sample(case, "cpu", seed=5, num_logprobs=20)
    ref_tokens, ref_logprobs, (ref_ids, _) = reference.sample(*case.args(5), 20)
    assert torch.equal(tokens, ref_tokens) and torch.equal(top_ids, ref_ids)
    assert_close(logprobs, ref_logprobs, torch.float32, "logprobs")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in backends.MODULES["sample"]])
@pytest.mark.parametrize("vocab", [151_936, 262_144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_vocabulary_gpu(backend, vocab, dtype):
    if (why := missing_feature(backend, "cuda")) is not None:
        pytest.skip(why)
    case = make_sampling_case(64, vocab, dtype=dtype, device="cuda", seed=vocab)
    tokens, logprobs, (top_ids, _) = _sample(case, backend, seed=5, num_logprobs=20)
    ref_tokens, ref_logprobs, (ref_ids, _) = reference.sample(*case.args(5), 20)
    assert (tokens != ref_tokens).sum() <= 1  # a float32 near-tie, see the test above
    assert torch.equal(top_ids, ref_ids)
    assert_close(logprobs, ref_logprobs, torch.float32, "logprobs")


@pytest.mark.gpu
def test_gpu_path_never_synchronises_with_the_host():
    case = make_sampling_case(64, 32_000, dtype=torch.bfloat16, device="cuda", seed=13)
    _sample(case, None, seed=1, num_logprobs=5)  # compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        _sample(case, None, seed=1, num_logprobs=5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_captures_in_a_cuda_graph_and_replays_on_new_inputs():
    case = make_sampling_case(64, 32_000, device="cuda", seed=14)
    _sample(case, None, seed=3)  # compile before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, logprobs, _ = _sample(case, None, seed=3)
    case.logits.copy_(torch.randn_like(case.logits) * 3)
    case.offsets += 1  # the next step's draws
    graph.replay()
    ref_tokens, ref_logprobs, _ = reference.sample(*case.args(3))
    assert (tokens != ref_tokens).sum() <= 1
    assert_close(logprobs, ref_logprobs, torch.float32, "logprobs")


# ---------------------------------------------------------------------------------------------
# Reproducibility


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_same_seed_and_offset_same_token(backend, device):
    case = make_sampling_case(8, 700, device=device, seed=2)
    first, again = _sample(case, backend, seed=9)[0], _sample(case, backend, seed=9)[0]
    assert torch.equal(first, again)
    sampled = case.temperature > 0
    other_seed = _sample(case, backend, seed=10)[0]
    assert (other_seed != first)[sampled].any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_row_does_not_depend_on_its_batch(backend, device):
    case = make_sampling_case(64, 300, device=device, seed=4)
    batch_tokens = _sample(case, backend, seed=1)[0]
    for b in (0, 29, 63):
        alone = make_sampling_case(0, 300, device=device)
        for name in ("logits", "temperature", "top_k", "top_p", "min_p", "offsets"):
            setattr(alone, name, getattr(case, name)[b : b + 1])
        assert _sample(alone, backend, seed=1)[0].item() == batch_tokens[b].item()


def test_offsets_give_independent_draws():
    """The n samples of one prompt (same logits, consecutive offsets) spread like fresh draws."""
    logits = torch.zeros(4)
    tokens = _draw(_rows(logits, offsets=torch.arange(4000)), STATS_BACKEND)
    pairs = torch.bincount(tokens[:-1] * 4 + tokens[1:], minlength=16).float()
    assert _p_value(pairs, torch.full((16,), 1 / 16), dof=15) > 1e-4


def test_uniforms_follow_the_documented_hash():
    """The reference's tensor RNG equals the formula written out with Python integers."""

    def fmix32(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    for seed, offset in [(0, 0), (2**64 - 1, -1), (123456789, 2**40 + 5)]:
        o = offset & (2**64 - 1)
        k = fmix32(fmix32((seed & 0xFFFFFFFF) ^ 0x6A09E667) ^ (seed >> 32))
        key = fmix32(fmix32((o & 0xFFFFFFFF) ^ k) ^ (o >> 32))
        step = fmix32(key ^ 0xBB67AE85) | 1
        want = [((fmix32((i * step + key) & 0xFFFFFFFF) >> 9) * 2 + 1) / 2**24 for i in range(5)]
        got = reference.sampling_uniforms(seed, torch.tensor([offset]), 5)[0]
        assert got.tolist() == want


# ---------------------------------------------------------------------------------------------
# Filters and their ties


LOGITS8 = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.3, 0.0, -0.5, -1.0])
FILTERS = {
    "plain": dict(),
    "top_k": dict(top_k=3),
    "top_p": dict(top_p=0.7),
    "min_p": dict(min_p=0.3),
    "all": dict(top_k=5, top_p=0.9, min_p=0.2),
}


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tight_filters_on_flat_rows(backend, device):
    """The largest keys of a flat row are mostly filtered out: the Triton kernel then searches
    the exact threshold (top-k alone, top-p alone, min-p alone, and top-k with top-p)."""
    settings = [(1.0, 1, 1.0, 0.0), (1.0, 0, 0.002, 0.0), (1.0, 0, 1.0, 0.97), (1.0, 3, 0.5, 0.0),
                (0.5, 2, 1.0, 0.0), (1.0, 7, 0.3, 0.5)]
    case = make_sampling_case(6, 1500, device=device, seed=6, settings=settings)
    flat = torch.randn(6, 1500, generator=torch.Generator().manual_seed(6)) * 0.3
    case.logits = flat.to(device)
    tokens, logprobs, _ = _sample(case, backend, seed=2)
    ref_tokens, ref_logprobs, _ = reference.sample(*case.args(2))
    assert torch.equal(tokens.cpu(), ref_tokens.cpu())
    assert_close(logprobs, ref_logprobs, torch.float32, "logprobs")


def _mixed_rows(batch, vocab, seed, *, levels=None, scale=2.0, device="cpu"):
    """Rows with their own settings: greedy rows, top-k from 1 to 150, top-p, min-p and their
    combinations; ``levels`` rounds the logits to that many steps per unit (ties everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=gen) * scale
    if levels is not None:
        logits = (logits * levels).round() / levels
    coin = lambda p: torch.rand(batch, generator=gen) < p
    temperature = torch.where(coin(0.15), 0.0, 0.3 + 1.5 * torch.rand(batch, generator=gen))
    top_k = torch.where(coin(0.6), torch.randint(1, 150, (batch,), generator=gen), 0).int()
    top_p = torch.where(coin(0.5), 0.01 + 0.99 * torch.rand(batch, generator=gen), 1.0)
    min_p = torch.where(coin(0.3), 0.5 * torch.rand(batch, generator=gen), 0.0)
    offsets = torch.randint(0, 2**40, (batch,), generator=gen)
    return tuple(t.to(device) for t in (logits, temperature, top_k, top_p, min_p, offsets))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("vocab,levels", [(777, 4), (1000, None), (20, 1)], ids=str)
def test_mixed_settings_with_ties_match_reference(backend, device, vocab, levels):
    """Every row its own filters, tied logits at every threshold: the tokens equal the
    reference's (the thresholds are found by the same strict comparisons)."""
    rows = _mixed_rows(24, vocab, seed=vocab, levels=levels, device=device)
    args = (*rows[:5], 123, rows[5])
    tokens, logprobs, _ = ops.sample(*args, backend=backend)
    ref_tokens, ref_logprobs, _ = reference.sample(*(t.cpu() if torch.is_tensor(t) else t
                                                     for t in args))
    assert torch.equal(tokens.cpu(), ref_tokens)
    assert_close(logprobs, ref_logprobs, torch.float32, "logprobs")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_top_k_threshold_shared_by_many_groups(backend, device):
    """Three logit values only: the k-th largest is tied across every group of 32 tokens, more
    than the Triton kernel gathers, so it searches the whole row; the draw still matches."""
    gen = torch.Generator().manual_seed(21)
    logits = torch.randint(0, 3, (6, 5000), generator=gen).float()
    settings = [(1.0, 126, 1.0, 0.0), (1.0, 126, 0.4, 0.0), (0.7, 5, 1.0, 0.0),
                (1.0, 0, 0.2, 0.0), (1.0, 0, 1.0, 0.9), (1.0, 60, 0.9, 0.5)]
    case = make_sampling_case(6, 5000, device=device, seed=21, settings=settings)
    case.logits = logits.to(device)
    tokens, logprobs, _ = _sample(case, backend, seed=8)
    ref_tokens, ref_logprobs, _ = reference.sample(*case.args(8))
    assert torch.equal(tokens.cpu(), ref_tokens.cpu())
    assert_close(logprobs, ref_logprobs, torch.float32, "logprobs")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_min_p_alone_over_many_groups(backend, device):
    """One kept token in every group of 32, the rest just below min-p's cut and holding most of
    the mass: the candidates are mostly dropped and too many groups qualify to gather, so the
    Triton kernel draws over the whole row without a threshold search."""
    logits = torch.full((6000,), -0.2)
    logits[::32] = 0.0
    rows = _rows(logits, min_p=0.9, offsets=torch.arange(12) * 31, device=device)
    tokens = _draw(rows, backend).cpu()
    assert (tokens % 32 == 0).all()
    assert torch.equal(tokens, reference.sample(*(t.cpu() for t in rows[:5]), 0,
                                                rows[5].cpu())[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_likely_tokens_packed_together(backend, device):
    """The likeliest tokens sit side by side (one or two of the Triton kernel's groups)."""
    settings = [(1.0, 0, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.0, 0, 0.3, 0.0), (2.0, 0, 1.0, 0.9)]
    case = make_sampling_case(4, 2100, device=device, seed=12, settings=settings)
    logits = torch.full((4, 2100), -4.0)
    logits[:, 1030:1062] = 2 + torch.rand(4, 32, generator=torch.Generator().manual_seed(12))
    case.logits = logits.to(device)
    tokens = _sample(case, backend, seed=4)[0]
    assert torch.equal(tokens.cpu(), reference.sample(*case.args(4))[0].cpu())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_excluded_tokens_never_drawn(backend, device):
    logits = torch.randn(200, generator=torch.Generator().manual_seed(3)) * 2
    draws = 2000 if backend == "cpu" else 12
    for name, filters in FILTERS.items():
        kept = _kept(logits, 0.8, **filters)
        rows = _rows(logits, temperature=0.8, **filters, offsets=torch.arange(draws), device=device)
        tokens = _draw(rows, backend)
        assert kept[tokens.cpu()].all(), f"{name}: drew a token the filter excludes"


def _p_value(observed: torch.Tensor, probs: torch.Tensor, dof: int) -> float:
    """Chi-square goodness of fit: P(X >= statistic) for X ~ chi2(dof)."""
    expected = probs.double() * observed.sum()
    statistic = ((observed.double() - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


@pytest.mark.parametrize("name", list(FILTERS))
def test_draws_follow_the_filtered_distribution(name):
    """Chi-square over 20,000 draws; fixed seeds, so the outcome is fixed (p = 1e-4 threshold)."""
    filters = FILTERS[name]
    kept = _kept(LOGITS8, 0.9, **filters)
    probs = torch.softmax(torch.where(kept, LOGITS8 / 0.9, float("-inf")), 0)
    rows = _rows(LOGITS8, temperature=0.9, **filters, offsets=torch.arange(20_000))
    tokens = _draw(rows, STATS_BACKEND)
    counts = torch.bincount(tokens, minlength=8)
    assert (counts[~kept] == 0).all()
    assert _p_value(counts[kept], probs[kept], dof=int(kept.sum()) - 1) > 1e-4


def test_ties_at_a_threshold_are_all_kept():
    """The documented rule, on the reference: a filter keeps every token tied with one it keeps."""
    x = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.0])
    assert _kept(x, top_k=2).tolist() == [True, True, True, True, False, False]
    e = torch.exp(x - 3)
    # The mass strictly above the tied tokens is e[0] / total, below top_p: all three are kept.
    top_p = float(e[0] / e.sum()) + 1e-3
    assert _kept(x, top_p=top_p).tolist() == [True, True, True, True, False, False]
    assert _kept(x, top_p=float(e[0] / e.sum()) - 1e-3).tolist() == [True] + [False] * 5
    assert _kept(x, min_p=float(e[1])).tolist() == [True, True, True, True, False, False]
    assert _kept(x, top_k=6, top_p=1.0, min_p=0.0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tied_tokens_at_the_top_k_edge_are_drawn(backend, device):
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0, -3.0, -4.0])
    draws = 400 if backend == "cpu" else 32
    rows = _rows(logits, top_k=2, offsets=torch.arange(draws), device=device)
    tokens = _draw(rows, backend).cpu()
    assert set(tokens.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_banned_tokens(backend, device):
    """-inf logits are never drawn, and rank last (lowest id first) among the top logprobs."""
    logits = torch.full((40,), float("-inf"))
    logits[[3, 17, 22]] = torch.tensor([0.5, 0.5, -1.0])
    rows = _rows(logits, top_k=30, offsets=torch.arange(16), device=device)
    tokens, logprobs, (ids, values) = ops.sample(*rows[:5], 0, rows[5], 6, backend=backend)
    assert set(tokens.cpu().tolist()) <= {3, 17, 22}
    assert ids[0].tolist() == [3, 17, 22, 0, 1, 2]
    assert torch.isneginf(values[:, 3:]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_greedy_is_first_argmax_with_log_softmax(backend, device):
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(8))
    logits[1, [10, 400]] = logits[1].max() + 1  # a tie: the lower id wins
    logits = logits.to(device)
    zeros = torch.zeros(4, device=device)
    top_k = torch.full((4,), 3, dtype=torch.int32, device=device)
    top_p = torch.full((4,), 0.5, device=device)
    tokens, logprobs, (ids, values) = ops.sample(
        logits, zeros, top_k, top_p, zeros, 0, torch.arange(4, device=device), 3, backend=backend)
    log_softmax = torch.log_softmax(logits.float(), -1)
    assert tokens.tolist() == logits.argmax(-1).tolist() and tokens[1] == 10
    assert_close(logprobs, log_softmax.gather(1, tokens[:, None])[:, 0], torch.float32, "logprobs")
    assert ids[1, :2].tolist() == [10, 400]
    assert_close(values, log_softmax.gather(1, ids), torch.float32, "top_logprobs")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    case = make_sampling_case(0, 100, device=device)
    tokens, logprobs, top = _sample(case, backend, num_logprobs=2)
    assert tokens.shape == (0,) and logprobs.shape == (0,) and top[0].shape == (0, 2)


def test_no_top_logprobs_is_none():
    case = make_sampling_case(3, 50)
    assert _sample(case, "torch")[2] is None
