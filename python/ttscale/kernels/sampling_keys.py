"""A row's Gumbel keys in the sample kernels, and picking the largest of them.

The random numbers are the reference's bit for bit (:mod:`ttscale.reference.sampling`): token
``i`` of a row draws ``fmix32(i * step + key)``, the row's ``(key, step)`` coming from the seed
and the row's offset; ``u`` from those bits is exact in (0, 1), ``E = -log(u)`` and the Gumbel
noise is ``-log(E)``. A token's key is ``(x - max x) + g`` with ``x = logits / temperature``.
"""

from __future__ import annotations

import triton
import triton.language as tl

GROUP = tl.constexpr(32)  # consecutive tokens that pass 1 summarises by their best race
TAKEN = tl.constexpr(2**30)  # the id of a used or empty slot, above any vocabulary


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finaliser on uint32."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _row_rng(seed_lo, seed_hi, offset):
    """The row's (key, step) from the seed's two words and the row's int64 offset."""
    k = _fmix32(_fmix32(seed_lo.to(tl.uint32) ^ 0x6A09E667) ^ seed_hi.to(tl.uint32))
    offset_lo = (offset & 0xFFFFFFFF).to(tl.uint32)
    offset_hi = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    key = _fmix32(_fmix32(offset_lo ^ k) ^ offset_hi)
    step = _fmix32(key ^ 0xBB67AE85) | 1
    return key, step


@triton.jit
def _exponential(token, key, step):
    """E = -log(u) of each token (int32 ids), u exact in (0, 1); the Gumbel noise is -log(E)."""
    bits = _fmix32(token.to(tl.uint32) * step + key)
    u = (bits >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.960464477539063e-08  # 2^-23, 2^-24
    return -tl.log(u)


@triton.jit
def _scaled_logits(row_ptr, offs, vocab, inv_t):
    """x = logits * (1 / temperature) in float32; -inf past the vocabulary."""
    return tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) * inv_t


@triton.jit
def _token_keys(row_ptr, ids, vocab, inv_t, row_max, key, step):
    """x and the key (x - row_max) + g of the given token ids (TAKEN: -inf)."""
    x = _scaled_logits(row_ptr, ids, vocab, inv_t)
    return x, (x - row_max) - tl.log(_exponential(ids, key, step))


@triton.jit
def _select(values, ids, COUNT: tl.constexpr):
    """The ids of the COUNT largest values, largest first, equal values by lowest id.

    A chosen id becomes TAKEN, so it is not chosen again even when its value ties (``-inf``);
    slots past the vocabulary carry TAKEN from the start.
    """
    chosen = tl.full([COUNT], TAKEN, tl.int32)
    slot = tl.arange(0, COUNT)
    for r in tl.static_range(COUNT):
        best = tl.max(values, 0)
        best_id = tl.min(tl.where(values == best, ids, TAKEN), 0)
        chosen = tl.where(slot == r, best_id, chosen)
        taken = ids == best_id
        values = tl.where(taken, float("-inf"), values)
        ids = tl.where(taken, TAKEN, ids)
    return chosen


@triton.jit
def _top_group_tokens(values, COUNT: tl.constexpr):
    """Token ids ``[COUNT * GROUP]`` of the COUNT groups with the largest values (equal values:
    lowest group), given one value per group of GROUP consecutive tokens.

    When a group's value is the largest ranking value among its tokens, these groups hold the
    COUNT highest-ranked tokens: every group ranked above the one holding the r-th token holds a
    token ranked above it, and there are fewer than r of those.
    """
    groups = _select(values, tl.arange(0, values.shape[0]), COUNT)
    return tl.reshape(groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :], [COUNT * GROUP])
