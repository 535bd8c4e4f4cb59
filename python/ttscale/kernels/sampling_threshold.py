"""Exact sampling thresholds from a row's group maxima, and the draw from the gathered groups,
without a second read of the row.

The sample kernels (:mod:`ttscale.kernels.sampling`) summarise every group of ``GROUP``
consecutive tokens by its largest scaled logit. A token at or above a threshold ``T`` lies in a
group whose maximum is at least ``T``, so any lower bound ``L <= T`` that the group maxima alone
give selects a set of groups holding every kept token. When that set is small (top-k with a
small ``k``; top-p or min-p on a peaked row) the finishing program gathers those groups' tokens
(a few thousand, from L2) and finds the thresholds exactly on them by bisection over the
float32 order, in the same comparisons as the reference's (``sampling_kept``): top-k keeps a
token when fewer than ``k`` tokens are strictly larger, top-p when the top-k tokens strictly
larger hold less than ``top_p`` of the top-k set's mass. Bounds, each a value known not to be
kept:

- top-k: ``L_k``, the k-th largest group maximum: at least ``k`` tokens are ``>= L_k`` (each
  of those groups' maxima), so the k-th largest token is at least ``L_k``;
- top-p alone: ``L_p``, the largest value whose strictly larger group maxima already hold
  ``top_p * Z`` (each such group holds at least its maximum's mass), so ``T > L_p``;
- min-p: the groups whose maximum passes min-p (min-p is applied per token afterwards; the
  bisection is then exact above min-p's cut, and below it min-p decides alone).

Values are compared as float32 in the kernels; the bisection runs over ``_ordered`` integers,
where -0.0 is first made +0.0 so that the integer order and the float comparisons agree.
``_gathered_draw`` is the finishing program's use of all this: it picks the groups, gathers
their ids, finds the threshold and takes the Gumbel-max of the gathered tokens above it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ttscale.kernels.sampling_keys import GROUP, TAKEN, _token_keys

NO_BOUND = tl.constexpr(-2139095042)  # _ordered(-inf) - 1: below every value


@triton.jit
def _ordered(x):
    """float32 -> int32 with the same order (negative floats' magnitude bits flipped; -0 as 0)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _unordered(i):
    """The inverse of _ordered (on values above NO_BOUND)."""
    return tl.where(i < 0, i ^ 0x7FFFFFFF, i).to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest_ordered(keys, k):
    """The k-th largest of the int32 ``keys`` (an ``_ordered`` order) with multiplicity, as an
    int64; NO_BOUND when fewer than ``k`` keys lie above NO_BOUND."""
    lo = tl.full([], NO_BOUND, tl.int64)  # the answer is at least lo
    hi = tl.max(keys, 0).to(tl.int64) + 1  # and below hi
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        enough = tl.sum((keys >= mid).to(tl.int32), 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    return lo


@triton.jit
def _mass_bound_ordered(keys, mass, limit):
    """The largest ordered value ``v`` whose strictly larger ``keys`` hold at least ``limit`` of
    ``mass`` (int64; NO_BOUND when all of them together hold less)."""
    lo = tl.full([], NO_BOUND, tl.int64)
    hi = tl.max(keys, 0).to(tl.int64)  # nothing lies above the largest key
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        enough = tl.sum(tl.where(keys > mid, mass, 0.0), 0) >= limit
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    return lo


@triton.jit
def _least_kept(x, mass, lo, hi, count_limit, mass_limit):
    """The least float32 ``v`` in ``(unordered(lo), unordered(hi)]`` at which fewer than
    ``count_limit`` of ``x`` lie strictly above ``v`` and their ``mass`` is below ``mass_limit``.

    The condition holds at ``hi`` (the row's max) and for every value above one where it holds;
    ``lo`` is a value where it fails, or below which the gathered tokens are incomplete.
    """
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        above = x > _unordered(mid.to(tl.int32))
        kept = (tl.sum(above.to(tl.int32), 0) < count_limit) & (
            tl.sum(tl.where(above, mass, 0.0), 0) < mass_limit)
        hi = tl.where(kept, mid, hi)
        lo = tl.where(kept, lo, mid)
    return _unordered(hi.to(tl.int32))


@triton.jit
def _groups_to_gather(group_max, in_row, row_max, row_sum, top_k, top_p, min_p, k_on, p_on):
    """Which groups can hold a kept token ``[ROW_GROUPS]``, and the ordered value below which
    the gathered tokens may be incomplete (the search's lower end)."""
    keys = tl.where(in_row, _ordered(group_max), NO_BOUND)
    need = in_row
    lo = tl.full([], NO_BOUND, tl.int64)
    if k_on:
        k_bound = _kth_largest_ordered(keys, top_k)
        need &= keys >= k_bound
        lo = tl.maximum(lo, k_bound - 1)
    if p_on & (k_on == 0):
        mass = tl.where(in_row, tl.exp(group_max - row_max), 0.0)
        p_bound = _mass_bound_ordered(keys, mass, top_p * row_sum)
        need &= keys > p_bound
        lo = tl.maximum(lo, p_bound)
    if (k_on & p_on) == 0:  # top-p inside top-k needs the whole top-k set's mass
        need &= tl.exp(group_max - row_max) >= min_p
    return need, lo


@triton.jit
def _gathered_threshold(x, mass, lo, row_max, row_sum, top_k, top_p, k_on, p_on):
    """The least kept x among the gathered tokens (x ``-inf`` and mass 0 in unused slots),
    before min-p: top-k's threshold, then top-p's inside the top-k set."""
    hi = _ordered(row_max).to(tl.int64)
    count_limit = tl.where(k_on, top_k, 2**31 - 1)
    kept_mass = row_sum
    if k_on & p_on:
        k_threshold = _least_kept(x, mass, lo, hi, top_k, float("inf"))
        mass = tl.where(x >= k_threshold, mass, 0.0)
        kept_mass = tl.sum(mass, 0)
    mass_limit = tl.where(p_on, top_p * kept_mass, float("inf"))
    return _least_kept(x, mass, lo, hi, count_limit, mass_limit)


@triton.jit
def _gathered_draw(
    row_ptr, gather_ptr, group_max_ptr, vocab, num_groups, inv_t, row_max, row_sum,
    top_k, top_p, min_p, k_on, p_on, key, step,
    ROW_GROUPS: tl.constexpr, GATHER_GROUPS: tl.constexpr,
):
    """The row's token from the groups that can hold a kept token, exactly, when there are at
    most GATHER_GROUPS of them (sampling_threshold.py); TAKEN when there are more."""
    group = tl.arange(0, ROW_GROUPS)
    in_row = group < num_groups
    group_max = tl.load(group_max_ptr + group, mask=in_row, other=float("-inf"))
    need, lo = _groups_to_gather(
        group_max, in_row, row_max, row_sum, top_k, top_p, min_p, k_on, p_on)
    count = tl.sum(need.to(tl.int32), 0)
    token = tl.full([], TAKEN, tl.int32)
    if count <= GATHER_GROUPS:
        tl.store(gather_ptr + tl.cumsum(need.to(tl.int32), 0) - 1, group, mask=need)
        tl.debug_barrier()  # the ids stored above, read back by other threads of the program
        slot = tl.arange(0, GATHER_GROUPS)
        chosen = tl.load(gather_ptr + slot, mask=slot < count, other=0)
        ids = chosen[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        ids = tl.where((slot < count)[:, None] & (ids < vocab), ids, TAKEN)
        ids = tl.reshape(ids, [GATHER_GROUPS * GROUP])
        x, keys = _token_keys(row_ptr, ids, vocab, inv_t, row_max, key, step)
        mass = tl.exp(x - row_max)
        threshold = _gathered_threshold(x, mass, lo, row_max, row_sum, top_k, top_p, k_on, p_on)
        keys = tl.where((x >= threshold) & (mass >= min_p), keys, float("-inf"))
        best = tl.max(keys, 0)
        token = tl.min(tl.where(keys == best, ids, TAKEN), 0)
    return token

