"""Plain-torch definitions of every op: the specification the kernels are tested against.

Slow on purpose: one sequence at a time, everything in float32, no cleverness. The public
ops in :mod:`ttscale.ops` validate their arguments; these functions assume valid input.
Log-sum-exp values are natural logarithms.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` rows of a paged cache ``[num_blocks, block_size, H, D]`` -> ``[length, H, D]``."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    rows = cache[block_table[:num_blocks].long()].reshape(-1, *cache.shape[2:])
    return rows[:length]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with GQA. q ``[T, Hq, D]``, k/v ``[L, Hkv, D]``, mask ``[T, L]`` (True = visible).

    Returns out ``[T, Hq, D]`` float32 and lse ``[T, Hq]`` float32; a query that sees nothing
    gets out 0 and lse -inf.
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,lhd->htl", q.float(), k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, T]
    visible = lse.unsqueeze(-1) > NEG_INF
    probs = torch.where(visible, torch.exp(scores - lse.unsqueeze(-1)), 0.0)
    out = torch.einsum("htl,lhd->thd", probs, v)
    return out, lse.transpose(0, 1).contiguous()


def sequence_kv(
    cache: torch.Tensor,
    prompt_block_tables: torch.Tensor,
    prompt_lens: torch.Tensor,
    problem_ids: torch.Tensor,
    suffix_block_tables: torch.Tensor,
    suffix_lens: torch.Tensor,
    b: int,
) -> torch.Tensor:
    """Sequence ``b``'s whole context from one cache: its problem's prompt, then its own suffix."""
    p = int(problem_ids[b])
    prompt = gather_blocks(cache, prompt_block_tables[p], int(prompt_lens[p]))
    suffix = gather_blocks(cache, suffix_block_tables[b], int(suffix_lens[b]))
    return torch.cat([prompt, suffix])


def cascade_decode_attention(
    q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids, suffix_block_tables,
    suffix_lens, scale=None,
):
    """One query token per sequence over its prompt (level 0) and its suffix (level 1).

    q ``[B, Hq, D]`` -> out ``[B, Hq, D]`` (q's dtype), lse ``[B, Hq]`` float32.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tables = (prompt_block_tables, prompt_lens, problem_ids, suffix_block_tables, suffix_lens)
    outs, lses = [], []
    for b in range(q.shape[0]):
        k = sequence_kv(k_cache, *tables, b)
        v = sequence_kv(v_cache, *tables, b)
        out, lse = attend(q[b : b + 1], k, v, scale)
        outs.append(out)
        lses.append(lse)
    if not outs:
        return torch.empty_like(q), torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    return torch.cat(outs).to(q.dtype), torch.cat(lses)


def paged_prefill_attention(
    q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids, suffix_block_tables,
    suffix_lens, q_lens, scale=None,
):
    """Each sequence's last ``q_lens[b]`` context tokens attend causally to its context.

    q ``[total_q, Hq, D]`` packs the sequences' new tokens in order -> out like q, lse
    ``[total_q, Hq]`` float32. The new tokens' K/V are already in the cache.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tables = (prompt_block_tables, prompt_lens, problem_ids, suffix_block_tables, suffix_lens)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], NEG_INF, dtype=torch.float32, device=q.device)
    start = 0
    for b in range(q_lens.shape[0]):
        n = int(q_lens[b])
        k = sequence_kv(k_cache, *tables, b)
        v = sequence_kv(v_cache, *tables, b)
        context = k.shape[0]
        positions = torch.arange(context - n, context, device=q.device)  # of the new tokens
        mask = torch.arange(context, device=q.device)[None, :] <= positions[:, None]
        out[start : start + n], lse[start : start + n] = attend(q[start : start + n], k, v, scale, mask)
        start += n
    return out.to(q.dtype), lse


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps.

    o ``[N, H, D]``, lse ``[N, H]`` float32. A side with lse -inf contributes nothing, whatever its o.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    part_a = torch.where((lse_a > NEG_INF).unsqueeze(-1), torch.exp(lse_a - lse).unsqueeze(-1) * o_a.float(), 0.0)
    part_b = torch.where((lse_b > NEG_INF).unsqueeze(-1), torch.exp(lse_b - lse).unsqueeze(-1) * o_b.float(), 0.0)
    return (part_a + part_b).to(o_a.dtype), lse


def write_kv(k_cache, v_cache, k, v, slots):
    """Scatter rows k/v ``[N, Hkv, D]`` into the caches at flat slots ``block * block_size + offset``.

    A slot of -1 is skipped (a padded row). Modifies the caches in place.
    """
    keep = slots >= 0
    rows = slots[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[rows] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[rows] = v[keep].to(v_cache.dtype)


# ---------------------------------------------------------------------------------------------
# sample
#
# Randomness is one counter-based generator that every backend implements bit for bit: token i
# of a row draws the 32 bits fmix32(i * step + key) (murmur3's finaliser; arithmetic mod 2**32),
# where the row's key and odd step come from (seed, offset) by chained fmix32. The bits become
# u = (2 * (bits >> 9) + 1) / 2**24, exactly representable, in (0, 1), and the Gumbel noise
# g = -log(-log(u)). Sampling is Gumbel-max: argmax of the key (x - max x) + g over the kept
# tokens. Keys are taken relative to the row's max so that float32 resolves them finely at the
# top whatever the logits' scale (x = logits / temperature can be huge at low temperature).

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
