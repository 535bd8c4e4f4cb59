"""Triton kernels of the sample op: Gumbel-max over the filtered vocabulary, no sort.

The token is the kept token with the largest key ``(x - max x) + g``
(:mod:`ttscale.reference.sampling` defines ``x``, the filters and the noise ``g = -log(E)``,
``E = -log(u)``; :mod:`ttscale.kernels.sampling_keys` computes them here). Every
filter keeps the tokens at or above a threshold on ``x``, and the few largest keys of a row are
known after one pass, so:

1. ``_chunk_stats_kernel`` (one program per chunk of a row) reads the logits once: the chunk's
   max, sum of ``exp(x - max)`` and argmax, and for each group of ``GROUP`` consecutive tokens
   an approximate key of its best token (ranked by the exponential race ``exp(x - max) / E``,
   the key's order with one logarithm per token instead of two) and its largest ``x`` (step
   4's bounds, and the top log-probabilities).
2. ``_row_merge_kernel`` (one program per row) merges the chunks: the row's max ``m``, total
   mass ``Z`` and argmax; the ``CANDIDATES`` groups with the largest keys, whose tokens' exact
   keys give the candidates (the row's largest keys, in key order); the top log-probabilities.
3. ``_probe_kernel`` (one program per chunk, only rows with top-p, or top-k above
   ``GATHER_GROUPS``) reads the logits a second time: for each candidate's ``x``, how many
   tokens lie strictly above it and their mass. That decides whether each filter keeps the
   candidate (min-p needs only ``m``).
4. ``_finish_kernel`` (one program per row) picks the first kept candidate in key order: every
   token with a larger key is a candidate that was dropped, so it is the Gumbel-max of the kept
   set. Rows with top-k up to ``GATHER_GROUPS`` or top-k with top-p skip the candidates, and
   rows where no candidate is kept (top-p or min-p far tighter than the spread of the row,
   about ``(1 - top_p) ** CANDIDATES`` of top-p rows) find the exact threshold from the group
   maxima of pass 1 (:mod:`ttscale.kernels.sampling_threshold`): the groups that can hold a
   kept token, when at most ``GATHER_GROUPS``, are gathered and bisected, with no further read
   of the row. Only when more groups qualify (ties across many groups, top-k above
   ``GATHER_GROUPS`` on a flat row, a loose top-p on a flat row) does the program search the
   whole row, ``SEARCH_PROBES`` thresholds per pass over the float32 order (min-p alone
   needs no search), then take the Gumbel-max over the tokens at or above the threshold.

So top-k rows (k <= ``GATHER_GROUPS``, with or without top-p and min-p) read the logits once,
top-p rows twice. Pass 3 runs its programs in reverse order so that it starts on the chunks
pass 1 read last, which may still be in L2. Rounding can make the race and the key order two
tokens differently only when their keys agree to about 1e-7; backends differ from the reference
in such near-ties only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttscale.backends import new_output
from ttscale.kernels.sampling_keys import (
    GROUP,
    TAKEN,
    _exponential,
    _row_rng,
    _scaled_logits,
    _select,
    _token_keys,
    _top_group_tokens,
)
from ttscale.kernels.sampling_threshold import _gathered_draw, _ordered, _unordered

CANDIDATES = 4  # largest keys kept per row: a top-p row falls back with odds (1 - top_p) ** 4
GATHER_GROUPS = 128  # groups (of GROUP tokens) the finishing pass gathers: top-k up to 128
SEARCH_PROBES = 16  # thresholds tested per pass of the exact search: 8 passes cover float32
SEARCH_BLOCK = 512


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _chunk_stats_kernel(
    logits_ptr, inv_t_ptr, offsets_ptr, seed_lo, seed_hi,
    chunk_max_ptr, chunk_sum_ptr, chunk_arg_ptr, group_key_ptr, group_max_ptr,
    vocab, num_chunks,
    BLOCK: tl.constexpr, NUM_LOGPROBS: tl.constexpr,
):
    pid = tl.program_id(0)
    row, chunk = pid // num_chunks, pid % num_chunks
    row_ptr = logits_ptr + row.to(tl.int64) * vocab
    GROUPS: tl.constexpr = BLOCK // GROUP
    groups = pid * GROUPS + tl.arange(0, GROUPS)
    offs = chunk * BLOCK + tl.arange(0, GROUPS)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    x = _scaled_logits(row_ptr, offs, vocab, tl.load(inv_t_ptr + row))  # [GROUPS, GROUP]
    group_max = tl.max(x, 1)
    finite_max = tl.where(group_max > float("-inf"), group_max, 0.0)  # a group of banned tokens
    mass = tl.exp(x - finite_max[:, None])
    group_sum = tl.sum(mass, 1)
    tl.store(group_max_ptr + groups, group_max)  # the finishing pass's bounds and logprobs

    # Rank the tokens by the exponential race mass / E, the order of their keys with one
    # logarithm per token; each group keeps its best as a key relative to the chunk's max.
    key, step = _row_rng(seed_lo, seed_hi, tl.load(offsets_ptr + row))
    race = tl.maximum(tl.max(mass / _exponential(offs, key, step), 1), 1e-30)  # > 0 if finite
    chunk_max = tl.max(group_max, 0)
    below = tl.where(group_max > float("-inf"), group_max - chunk_max, float("-inf"))
    tl.store(group_key_ptr + groups, below + tl.log(race))
    tl.store(chunk_max_ptr + pid, chunk_max)
    tl.store(chunk_sum_ptr + pid, tl.sum(group_sum * tl.exp(below), 0))
    ids = tl.where(offs < vocab, offs, TAKEN)
    tl.store(chunk_arg_ptr + pid, tl.min(tl.min(tl.where(x == chunk_max, ids, TAKEN), 1), 0))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _row_merge_kernel(
    logits_ptr, inv_t_ptr, offsets_ptr, seed_lo, seed_hi,
    chunk_max_ptr, chunk_sum_ptr, chunk_arg_ptr, group_key_ptr, group_max_ptr,
    row_max_ptr, row_sum_ptr, row_arg_ptr, row_key_ptr, row_id_ptr, row_x_ptr,
    top_ids_ptr, top_logprobs_ptr,
    vocab, num_chunks,
    CHUNKS: tl.constexpr, ROW_GROUPS: tl.constexpr, BLOCK: tl.constexpr,
    NUM_CANDIDATES: tl.constexpr, NUM_LOGPROBS: tl.constexpr, LOGPROBS_POW2: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * vocab
    inv_t = tl.load(inv_t_ptr + row)
    chunks = row * num_chunks + tl.arange(0, CHUNKS)
    in_row = chunks < (row + 1) * num_chunks
    chunk_max = tl.load(chunk_max_ptr + chunks, mask=in_row, other=float("-inf"))
    chunk_sum = tl.load(chunk_sum_ptr + chunks, mask=in_row, other=0.0)
    chunk_arg = tl.load(chunk_arg_ptr + chunks, mask=in_row, other=TAKEN)
    row_max = tl.max(chunk_max, 0)
    rescaled = chunk_sum * tl.exp(chunk_max - row_max)
    row_sum = tl.sum(tl.where(chunk_max > float("-inf"), rescaled, 0.0), 0)
    tl.store(row_max_ptr + row, row_max)
    tl.store(row_sum_ptr + row, row_sum)
    # Chunks cover increasing ids, so the lowest argmax among maximal chunks is the row's first.
    tl.store(row_arg_ptr + row, tl.min(tl.where(chunk_max == row_max, chunk_arg, TAKEN), 0))

    # Candidates: the groups with the largest approximate keys, then exact keys of their tokens.
    group = tl.arange(0, ROW_GROUPS)
    in_row = group < num_chunks * (BLOCK // GROUP)
    first_group = row * num_chunks * (BLOCK // GROUP)
    group_key = tl.load(group_key_ptr + first_group + group, mask=in_row, other=float("-inf"))
    group_chunk_max = tl.load(chunk_max_ptr + row * num_chunks + group // (BLOCK // GROUP),
                              mask=in_row, other=float("-inf"))
    group_key += tl.where(group_chunk_max > float("-inf"), group_chunk_max - row_max, 0.0)
    ids = _top_group_tokens(group_key, NUM_CANDIDATES)
    key, step = _row_rng(seed_lo, seed_hi, tl.load(offsets_ptr + row))
    _, keys = _token_keys(row_ptr, ids, vocab, inv_t, row_max, key, step)
    chosen = _select(keys, tl.where(ids < vocab, ids, TAKEN), NUM_CANDIDATES)
    x, keys = _token_keys(row_ptr, chosen, vocab, inv_t, row_max, key, step)
    r = row * NUM_CANDIDATES + tl.arange(0, NUM_CANDIDATES)
    tl.store(row_id_ptr + r, tl.minimum(chosen, vocab - 1))  # a row with fewer tokens than slots
    tl.store(row_key_ptr + r, keys)
    tl.store(row_x_ptr + r, x)

    if NUM_LOGPROBS > 0:
        group_max = tl.load(group_max_ptr + first_group + group, mask=in_row, other=float("-inf"))
        ids = _top_group_tokens(group_max, LOGPROBS_POW2)
        ids = tl.where(ids < vocab, ids, TAKEN)
        chosen = _select(_scaled_logits(row_ptr, ids, vocab, inv_t), ids, LOGPROBS_POW2)
        r = tl.arange(0, LOGPROBS_POW2)
        tl.store(top_ids_ptr + row * NUM_LOGPROBS + r, chosen, mask=r < NUM_LOGPROBS)
        x = _scaled_logits(row_ptr, chosen, vocab, inv_t)
        log_z = row_max + tl.log(row_sum)
        tl.store(top_logprobs_ptr + row * NUM_LOGPROBS + r, x - log_z, mask=r < NUM_LOGPROBS)


@triton.jit
def _filters_on(temperature, top_k, top_p, vocab):
    """Whether top-k and top-p constrain the row (never at temperature 0)."""
    sampled = temperature > 0
    return sampled & (top_k > 0) & (top_k < vocab), sampled & (top_p < 1.0)


@triton.jit
def _gathers_first(k_on, p_on, top_k, GATHER_GROUPS: tl.constexpr):
    """Rows that skip the candidates: top-k small enough that its groups are always gathered,
    or top-k with top-p (top-p needs the top-k set's mass, which the candidates do not give)."""
    return k_on & ((top_k <= GATHER_GROUPS) | p_on)


@triton.jit
def _probe_kernel(
    logits_ptr, inv_t_ptr, temperature_ptr, top_k_ptr, top_p_ptr, row_max_ptr, row_x_ptr,
    probe_count_ptr, probe_mass_ptr,
    vocab, num_chunks, num_programs,
    BLOCK: tl.constexpr, NUM_CANDIDATES: tl.constexpr, GATHER_GROUPS: tl.constexpr,
):
    pid = num_programs - 1 - tl.program_id(0)  # pass 1's last chunks first: they may be in L2
    row, chunk = pid // num_chunks, pid % num_chunks
    temperature, top_k = tl.load(temperature_ptr + row), tl.load(top_k_ptr + row)
    k_on, p_on = _filters_on(temperature, top_k, tl.load(top_p_ptr + row), vocab)
    if (k_on | p_on) & (_gathers_first(k_on, p_on, top_k, GATHER_GROUPS) == 0):
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        row_ptr = logits_ptr + row.to(tl.int64) * vocab
        x = _scaled_logits(row_ptr, offs, vocab, tl.load(inv_t_ptr + row))
        mass = tl.exp(x - tl.load(row_max_ptr + row))
        for r in tl.static_range(NUM_CANDIDATES):
            above = x > tl.load(row_x_ptr + row * NUM_CANDIDATES + r)
            slot = pid * NUM_CANDIDATES + r
            if k_on:
                tl.store(probe_count_ptr + slot, tl.sum(above.to(tl.int32), 0))
            if p_on:
                tl.store(probe_mass_ptr + slot, tl.sum(tl.where(above, mass, 0.0), 0))


@triton.jit
def _count_above(row_ptr, vocab, inv_t, row_max, probes, PROBES: tl.constexpr,
                 BLOCK: tl.constexpr):
    """For each probe v: tokens with x > v, their mass, and the mass of tokens with x >= v."""
    count = tl.zeros([PROBES], tl.int32)
    mass_gt = tl.zeros([PROBES], tl.float32)
    mass_ge = tl.zeros([PROBES], tl.float32)
    for start in range(0, vocab, BLOCK):
        x = _scaled_logits(row_ptr, start + tl.arange(0, BLOCK), vocab, inv_t)
        mass = tl.exp(x - row_max)[:, None]
        gt = x[:, None] > probes[None, :]
        count += tl.sum(gt.to(tl.int32), 0)
        mass_gt += tl.sum(tl.where(gt, mass, 0.0), 0)
        mass_ge += tl.sum(tl.where(x[:, None] >= probes[None, :], mass, 0.0), 0)
    return count, mass_gt, mass_ge


@triton.jit
def _search_threshold(
    row_ptr, vocab, inv_t, row_max, count_limit, mass_limit, min_p,
    PROBES: tl.constexpr, BLOCK: tl.constexpr,
):
    """The smallest x a token can have and be kept, and the mass of the tokens at or above it.

    kept(v) = (fewer than count_limit tokens above v) and (their mass below mass_limit) and
    exp(v - max) >= min_p. It holds for every value above a kept one and is constant between
    neighbouring values of x, so the least float32 where it holds is a value of x. Each step
    tests PROBES floats spread over (lo, hi] in float32 order; the last probe is hi itself, so
    the mass at the final hi is always at hand.
    """
    lo = _ordered(tl.full([], float("-inf"), tl.float32)).to(tl.int64) - 1  # below every x
    hi = _ordered(row_max).to(tl.int64)  # the max is always kept
    hi_mass = tl.full([], 0.0, tl.float32)
    steps = tl.arange(0, PROBES).to(tl.int64) + 1
    while hi - lo > 1:
        ranks = tl.minimum(tl.maximum(lo + (hi - lo) * steps // PROBES, lo + 1), hi)
        probes = _unordered(ranks.to(tl.int32))
        count, mass_gt, mass_ge = _count_above(
            row_ptr, vocab, inv_t, row_max, probes, PROBES, BLOCK)
        kept = (count < count_limit) & (mass_gt < mass_limit) & (tl.exp(probes - row_max) >= min_p)
        hi = tl.min(tl.where(kept, ranks, hi), 0)
        lo = tl.max(tl.where(kept, lo, ranks), 0)
        hi_mass = tl.max(tl.where(ranks == hi, mass_ge, 0.0), 0)
    return _unordered(hi.to(tl.int32)), hi_mass


@triton.jit
def _gumbel_max_above(row_ptr, vocab, inv_t, row_max, threshold, min_p, key, step,
                      BLOCK: tl.constexpr):
    """The token with the largest key among those with x >= threshold that pass min-p (lowest
    id on ties)."""
    best_key = tl.full([], float("-inf"), tl.float32)
    best_id = tl.full([], TAKEN, tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x, keys = _token_keys(row_ptr, offs, vocab, inv_t, row_max, key, step)
        keys = tl.where((x >= threshold) & (tl.exp(x - row_max) >= min_p), keys, float("-inf"))
        tile_key = tl.max(keys, 0)
        tile_id = tl.min(tl.where(keys == tile_key, offs, TAKEN), 0)
        better = tile_key > best_key
        best_id = tl.where(better, tile_id, best_id)
        best_key = tl.where(better, tile_key, best_key)
    return best_id


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _finish_kernel(
    logits_ptr, inv_t_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, offsets_ptr,
    seed_lo, seed_hi,
    row_max_ptr, row_sum_ptr, row_arg_ptr, row_key_ptr, row_id_ptr, row_x_ptr,
    probe_count_ptr, probe_mass_ptr, group_max_ptr, gather_ptr, tokens_ptr, logprobs_ptr,
    vocab, num_chunks, num_groups,
    CHUNKS: tl.constexpr, NUM_CANDIDATES: tl.constexpr, PROBES: tl.constexpr, BLOCK: tl.constexpr,
    ROW_GROUPS: tl.constexpr, GATHER_GROUPS: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * vocab
    inv_t = tl.load(inv_t_ptr + row)
    temperature, top_k = tl.load(temperature_ptr + row), tl.load(top_k_ptr + row)
    top_p, min_p = tl.load(top_p_ptr + row), tl.load(min_p_ptr + row)
    row_max, row_sum = tl.load(row_max_ptr + row), tl.load(row_sum_ptr + row)
    token = tl.load(row_arg_ptr + row)
    if temperature > 0:
        k_on, p_on = _filters_on(temperature, top_k, top_p, vocab)
        candidates_on = _gathers_first(k_on, p_on, top_k, GATHER_GROUPS) == 0
        r = tl.arange(0, NUM_CANDIDATES)
        cand_key = tl.load(row_key_ptr + row * NUM_CANDIDATES + r)
        cand_id = tl.load(row_id_ptr + row * NUM_CANDIDATES + r)
        cand_x = tl.load(row_x_ptr + row * NUM_CANDIDATES + r)
        chunks = tl.arange(0, CHUNKS)
        slots = (row * num_chunks + chunks)[:, None] * NUM_CANDIDATES + r[None, :]
        probed = tl.where((k_on | p_on) & candidates_on, (chunks < num_chunks)[:, None], False)
        # The probe pass wrote counts only for top-k rows and masses only for top-p rows.
        count = tl.sum(tl.load(probe_count_ptr + slots, mask=probed, other=0), 0)
        count = tl.where(k_on, count, 0)
        mass = tl.sum(tl.load(probe_mass_ptr + slots, mask=probed, other=0.0), 0)
        mass = tl.where(p_on, mass, 0.0)
        count_limit = tl.where(k_on, top_k, vocab + 1)
        mass_limit = tl.where(p_on, top_p * row_sum, float("inf"))
        kept = (cand_key > float("-inf")) & (tl.exp(cand_x - row_max) >= min_p)
        kept &= (count < count_limit) & (mass < mass_limit) & candidates_on
        first = tl.min(tl.where(kept, r, NUM_CANDIDATES), 0)
        token = tl.sum(tl.where(r == first, cand_id, 0), 0)
        if first == NUM_CANDIDATES:  # no candidate decides: the exact threshold, then Gumbel-max
            key, step = _row_rng(seed_lo, seed_hi, tl.load(offsets_ptr + row))
            token = _gathered_draw(
                row_ptr, gather_ptr + row * GATHER_GROUPS, group_max_ptr + row * num_groups,
                vocab, num_groups, inv_t, row_max, row_sum, top_k, top_p, min_p, k_on, p_on,
                key, step, ROW_GROUPS, GATHER_GROUPS)
            if token == TAKEN:  # too many groups to gather: the whole row
                threshold = tl.full([], float("-inf"), tl.float32)  # min-p alone: no search
                if k_on | p_on:
                    kept_mass = row_sum
                    if k_on & p_on:  # top-p is relative to the top-k set's mass
                        _, kept_mass = _search_threshold(
                            row_ptr, vocab, inv_t, row_max, top_k, float("inf"), 0.0, PROBES,
                            BLOCK)
                    mass_limit = tl.where(p_on, top_p * kept_mass, float("inf"))
                    threshold, _ = _search_threshold(
                        row_ptr, vocab, inv_t, row_max, count_limit, mass_limit, 0.0, PROBES,
                        BLOCK)
                token = _gumbel_max_above(
                    row_ptr, vocab, inv_t, row_max, threshold, min_p, key, step, BLOCK)
    tl.store(tokens_ptr + row, token)
    x = tl.load(row_ptr + token).to(tl.float32) * inv_t
    tl.store(logprobs_ptr + row, x - (row_max + tl.log(row_sum)))


def _chunk_size(vocab: int) -> int:
    """Tokens per program of the two full passes: several chunks per row even for small
    vocabularies, so that a small batch still fills the GPU."""
    return 4096 if vocab >= 65536 else 1024


def sample(logits, temperature, top_k, top_p, min_p, seed, offsets, num_logprobs):
    """Launch the four kernels; arguments validated by :func:`ttscale.ops.sample`."""
    batch, vocab = logits.shape
    device = logits.device
    tokens = new_output((batch,), torch.int64, device)
    logprobs = new_output((batch,), torch.float32, device)
    top_ids = new_output((batch, num_logprobs), torch.int64, device)
    top_logprobs = new_output((batch, num_logprobs), torch.float32, device)
    if batch == 0:
        return tokens, logprobs, top_ids, top_logprobs
    seed %= 2**64
    seed_lo, seed_hi = seed & 0xFFFFFFFF, seed >> 32
    inv_t = torch.where(temperature == 0, 1.0, 1.0 / temperature)  # correctly rounded, as elsewhere

    block = _chunk_size(vocab)
    num_chunks = triton.cdiv(vocab, block)
    programs = batch * num_chunks
    n, c = num_logprobs, CANDIDATES

    def scratch(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    i32, groups = torch.int32, programs * (block // GROUP)
    chunk_max, chunk_sum = scratch(programs), scratch(programs)
    chunk_arg = scratch(programs, dtype=i32)
    group_key, group_max = scratch(groups), scratch(groups)
    gathered = scratch(batch, GATHER_GROUPS, dtype=i32)
    row_max, row_sum, row_arg = scratch(batch), scratch(batch), scratch(batch, dtype=i32)
    row_key, row_id, row_x = scratch(batch, c), scratch(batch, c, dtype=i32), scratch(batch, c)
    probe_count, probe_mass = scratch(programs, c, dtype=i32), scratch(programs, c)

    _chunk_stats_kernel[(programs,)](
        logits, inv_t, offsets, seed_lo, seed_hi, chunk_max, chunk_sum, chunk_arg, group_key,
        group_max, vocab, num_chunks, BLOCK=block, NUM_LOGPROBS=n, num_warps=8)
    _row_merge_kernel[(batch,)](
        logits, inv_t, offsets, seed_lo, seed_hi, chunk_max, chunk_sum, chunk_arg, group_key,
        group_max, row_max, row_sum, row_arg, row_key, row_id, row_x, top_ids, top_logprobs,
        vocab, num_chunks, CHUNKS=triton.next_power_of_2(num_chunks),
        ROW_GROUPS=triton.next_power_of_2(num_chunks * (block // GROUP)), BLOCK=block,
        NUM_CANDIDATES=c, NUM_LOGPROBS=n, LOGPROBS_POW2=triton.next_power_of_2(n), num_warps=8)
    _probe_kernel[(programs,)](
        logits, inv_t, temperature, top_k, top_p, row_max, row_x, probe_count, probe_mass,
        vocab, num_chunks, programs, BLOCK=block, NUM_CANDIDATES=c, GATHER_GROUPS=GATHER_GROUPS,
        num_warps=8)
    _finish_kernel[(batch,)](
        logits, inv_t, temperature, top_k, top_p, min_p, offsets, seed_lo, seed_hi,
        row_max, row_sum, row_arg, row_key, row_id, row_x, probe_count, probe_mass, group_max,
        gathered, tokens, logprobs, vocab, num_chunks, num_chunks * (block // GROUP),
        CHUNKS=triton.next_power_of_2(num_chunks), NUM_CANDIDATES=c, PROBES=SEARCH_PROBES,
        BLOCK=SEARCH_BLOCK, ROW_GROUPS=triton.next_power_of_2(num_chunks * (block // GROUP)),
        GATHER_GROUPS=GATHER_GROUPS, num_warps=16)  # ptxas, sm_90: 4 warps spill the gathered tokens
    return tokens, logprobs, top_ids, top_logprobs
