"""The sample op: one token per row by Gumbel-max over the kept tokens, with its random numbers.

Randomness is one counter-based generator that every backend implements bit for bit: token i
of a row draws the 32 bits fmix32(i * step + key) (murmur3's finaliser; arithmetic mod 2**32),
where the row's key and odd step come from (seed, offset) by chained fmix32. The bits become
u = (2 * (bits >> 9) + 1) / 2**24, exactly representable, in (0, 1), and the Gumbel noise
g = -log(-log(u)). Sampling is Gumbel-max: argmax of the key (x - max x) + g over the kept
tokens. Keys are taken relative to the row's max so that float32 resolves them finely at the
top whatever the logits' scale (x = logits / temperature can be huge at low temperature).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
MASK32 = 0xFFFFFFFF
SEED_SALT = 0x6A09E667  # sqrt(2)'s fraction bits: seed 0 must not start from fmix32's fixed point 0
STEP_SALT = 0xBB67AE85  # sqrt(3)'s fraction bits


def mul32(a, c):
    """``a * c mod 2**32`` for values below 2**32 (ints, or int64 tensors without overflow)."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def fmix32(h):
    """murmur3's 32-bit finaliser, a bijection with full avalanche (ints or int64 tensors)."""
    h = h ^ (h >> 16)
    h = mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def sampling_row_key(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``(key, step)``: int64 tensors ``[B]`` holding 32-bit values, step odd."""
    seed &= 2**64 - 1
    k = fmix32(fmix32((seed & MASK32) ^ SEED_SALT) ^ (seed >> 32))
    key = fmix32(fmix32((offsets & MASK32) ^ k) ^ ((offsets >> 32) & MASK32))
    step = fmix32(key ^ STEP_SALT) | 1
    return key, step


def sampling_uniforms(seed: int, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """The uniforms ``[B, V]`` float32 in (0, 1) that rows with these offsets draw."""
    key, step = sampling_row_key(seed, offsets.long())
    token = torch.arange(vocab, device=offsets.device)
    bits = fmix32((mul32(token[None, :], step[:, None]) + key[:, None]) & MASK32)
    return (bits >> 9).float() * 2.0**-23 + 2.0**-24


def sampling_kept(x_row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Which tokens of one row of scaled logits ``[V]`` survive top-k, then top-p, then min-p.

    Every filter keeps all tokens at least as likely as any token it keeps, so ties at a
    threshold are all kept or all dropped:
    - top-k keeps a token when fewer than ``k`` tokens are strictly more likely (0: off);
    - top-p keeps a token of the top-k set when the top-k tokens strictly more likely hold less
      than ``top_p`` of the top-k set's mass (1: off);
    - min-p keeps a token whose probability is at least ``min_p`` times the largest.
    Probabilities are ``exp(x - max x)`` in float32; masses are summed in float64.
    """
    e = torch.exp(x_row - x_row.max())
    order = torch.argsort(x_row, descending=True)
    greater = torch.searchsorted(-x_row[order], -x_row, side="left")  # tokens strictly more likely
    kept = torch.ones_like(x_row, dtype=torch.bool)
    if top_k > 0:
        kept &= greater < top_k
    if top_p < 1:
        mass = torch.where(kept, e, 0.0).double()[order]
        mass_before = torch.cat([mass.new_zeros(1), torch.cumsum(mass, 0)[:-1]])
        kept &= mass_before[greater] < float(top_p) * float(mass.sum())
    return kept & (e >= min_p)


def sample(logits, temperature, top_k, top_p, min_p, seed, offsets, num_logprobs=0):
    """Draw one token per row; see :func:`ttscale.ops.sample` for the contract.

    logits ``[B, V]``; temperature, top_p, min_p float32 ``[B]``; top_k int32 ``[B]``; offsets
    int64 ``[B]``. Returns tokens int64 ``[B]``, logprobs float32 ``[B]`` and, when
    ``num_logprobs > 0``, ``(ids int64 [B, n], values float32 [B, n])``, else None.
    """
    greedy = temperature == 0
    inv_t = torch.where(greedy, 1.0, 1.0 / temperature)
    x = logits.float() * inv_t[:, None]  # the distribution logprobs report: log_softmax(x)
    gumbel = -torch.log(-torch.log(sampling_uniforms(seed, offsets, logits.shape[1])))
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    for b in range(logits.shape[0]):
        if greedy[b]:
            tokens[b] = torch.argmax(x[b])  # the first of equal maxima
            continue
        kept = sampling_kept(x[b], int(top_k[b]), float(top_p[b]), float(min_p[b]))
        keys = (x[b] - x[b].max()) + gumbel[b]
        tokens[b] = torch.argmax(torch.where(kept, keys, NEG_INF))  # the first of equal keys
    logp = torch.log_softmax(x.double(), dim=-1)
    logprobs = logp.gather(1, tokens[:, None])[:, 0].float()
    if not num_logprobs:
        return tokens, logprobs, None
    ids = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :num_logprobs]
    return tokens, logprobs, (ids, logp.gather(1, ids).float())
