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
# The decode step's elementwise work, each op as the model computes it unfused (model/).


def add_rms_norm(x, residual, weight, eps):
    """``summed = residual + x`` in their dtype, then RMSNorm of it: normalised in float32, cast
    back, then scaled. Returns ``(weight * normalised, summed)``."""
    summed = residual + x
    s = summed.float()
    normalised = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normalised, summed


def rotate(x, cos_sin):
    """Rotary embedding of ``x [T, H, D]`` by ``cos_sin [T, D]`` (cos of the D/2 angles, then
    sin), pairing dimension ``i`` with ``i + D/2``; float32, returned in x's dtype."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_write_kv(q, k, v, cos_sin, k_cache, v_cache, slots):
    """Rotate q and k, write the rotated k and v into the caches at ``slots`` (-1: skipped);
    return the rotated q ``[T, Hq, D]``."""
    write_kv(k_cache, v_cache, rotate(k, cos_sin), v, slots)
    return rotate(q, cos_sin)


def silu_mul(gate_up):
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` ``[T, 2I]``, in float32, rounded once
    to the input dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


# ---------------------------------------------------------------------------------------------
# PRM step scoring

PRM_KINDS = ("two_token", "two_class", "value")
PRM_AGGS = ("last", "min", "prod", "mean")

# The aggregate of a sequence with no steps yet (its count is 0).
PRM_EMPTY_AGGREGATE = {"last": 0.0, "min": float("inf"), "prod": 1.0, "mean": 0.0}


def prm_empty_state(num_seqs: int, agg: str, device=None) -> torch.Tensor:
    """The state ``[num_seqs, 2]`` float32 (aggregate, step count) of sequences with no steps."""
    state = torch.zeros(num_seqs, 2, dtype=torch.float32, device=device)
    state[:, 0] = PRM_EMPTY_AGGREGATE[agg]
    return state


def prm_head_scores(hidden, weight, bias=None, kind="two_token"):
    """Step scores ``[T]`` float32 from hidden states ``[T, H]`` and a head ``weight [2 or 1, H]``.

    two_token: P(+) of the softmax over the ``+``/``-`` logits; two_class: P(class 1);
    value: sigmoid of the single logit.
    """
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    if kind == "two_token":
        return torch.softmax(logits, dim=-1)[:, 0]
    if kind == "two_class":
        return torch.softmax(logits, dim=-1)[:, 1]
    return torch.sigmoid(logits[:, 0])


def two_token_from_full_vocab(hidden, lm_head, plus_id: int, minus_id: int):
    """P(+) the unfused way: all ``[T, V]`` logits, softmax, take ``+`` and ``-``, renormalise."""
    probs = torch.softmax(hidden.float() @ lm_head.float().T, dim=-1)
    plus, minus = probs[:, plus_id], probs[:, minus_id]
    return plus / (plus + minus)


def prm_step_scores(hidden, seq_ids, weight, bias=None, kind="two_token", agg="last", state=None):
    """Score each step and fold it into its sequence's running aggregate, one step at a time.

    hidden ``[T, H]``, seq_ids ``[T]`` (earlier rows of a sequence are earlier steps), state
    ``[S, 2]`` float32 (aggregate, count) or None for ``S = max(seq_ids) + 1`` empty sequences.
    A row with count 0 is empty whatever its aggregate. Returns scores ``[T]`` float32 and a new
    state; the input state is not modified.
    """
    scores = prm_head_scores(hidden, weight, bias, kind)
    if state is None:
        state = prm_empty_state(int(seq_ids.max()) + 1 if seq_ids.numel() else 0, agg, hidden.device)
    state = state.clone()
    empty = torch.tensor(PRM_EMPTY_AGGREGATE[agg], dtype=torch.float32, device=state.device)
    for t in range(scores.shape[0]):
        # 0-d float32 tensors: every operation rounds to float32, as in the kernels.
        s, step = int(seq_ids[t]), scores[t]
        count = state[s, 1]
        before = state[s, 0] if count > 0 else empty
        if agg == "last":
            after = step
        elif agg == "min":
            after = torch.fmin(before, step)
        elif agg == "prod":
            after = before * step
        else:
            after = before + (step - before) / (count + 1)
        state[s, 0], state[s, 1] = after, count + 1
    return scores, state


# ---------------------------------------------------------------------------------------------
# The KV block pool, in plain Python: the model the pool's kernels are tested against.
#
# State: ref_counts [num_blocks] (how many block tables hold each block), free_stack
# [num_blocks] whose first free_top entries are the free blocks (a pop takes
# free_stack[free_top - 1]), and status, whose bit POOL_EXHAUSTED records that a request found
# the stack empty. A table's used blocks are its first ceil(len / block_size) entries; the last
# is partial when len is not a multiple of block_size. Each function reads the tensors into
# lists, acts on the lists and writes them back.

POOL_EXHAUSTED = 1


def _read_pool(ref_counts, free_stack, free_top, status):
    return ref_counts.tolist(), free_stack.tolist(), int(free_top[0]), int(status[0])


def _write_pool(ref_counts, free_stack, free_top, status, counts, stack, top, flags):
    ref_counts.copy_(torch.tensor(counts, dtype=torch.int32))
    free_stack.copy_(torch.tensor(stack, dtype=torch.int32))
    free_top.fill_(top)
    status.fill_(flags)


def _release(counts: list[int], stack: list[int], top: int, blocks: list[int]) -> int:
    """Drop one reference per entry; blocks left with none are pushed in ascending order."""
    freed = set()
    for block in blocks:
        counts[block] -= 1
        if counts[block] == 0:
            freed.add(block)
    for block in sorted(freed):
        stack[top] = block
        top += 1
    return top


def pool_allocate(ref_counts, free_stack, free_top, status, wanted):
    """Pop one block for each True in ``wanted`` ``[B]``, in row order, with reference count 1.

    Returns ``[B]`` int32 blocks, -1 where not wanted or where the stack had run out (which sets
    ``POOL_EXHAUSTED`` in status).
    """
    counts, stack, top, flags = _read_pool(ref_counts, free_stack, free_top, status)
    blocks = []
    for want in wanted.tolist():
        if want and top > 0:
            top -= 1
            blocks.append(stack[top])
            counts[stack[top]] = 1
        else:
            flags |= POOL_EXHAUSTED if want else 0
            blocks.append(-1)
    _write_pool(ref_counts, free_stack, free_top, status, counts, stack, top, flags)
    return torch.tensor(blocks, dtype=torch.int32, device=wanted.device)


def pool_release(ref_counts, free_stack, free_top, status, blocks):
    """Each entry of ``blocks`` (any shape, -1 skipped) gives up one reference."""
    counts, stack, top, flags = _read_pool(ref_counts, free_stack, free_top, status)
    top = _release(counts, stack, top, [b for b in blocks.reshape(-1).tolist() if b >= 0])
    _write_pool(ref_counts, free_stack, free_top, status, counts, stack, top, flags)


def select_and_fork(
    scores, group_offsets, keep, children, block_tables, lens, ref_counts, free_stack, free_top,
    status, block_size, max_keep, num_slots, num_copies,
):
    """Keep the best candidates of each group, fork each kept one into children, free the rest.

    See :func:`ttscale.ops.select_and_fork` for the arguments and results.
    """
    score, nan, offsets = scores.tolist(), torch.isnan(scores).tolist(), group_offsets.tolist()
    keep, children = keep.tolist(), children.tolist()
    tables, lens = block_tables.tolist(), lens.tolist()
    counts, stack, top, flags = _read_pool(ref_counts, free_stack, free_top, status)

    def rank(i):  # sorts best first: numbers before NaN, higher scores first, then lower index
        return (nan[i], 0.0 if nan[i] else -score[i], i)

    def used(i):
        return tables[i][: -(-lens[i] // block_size)]

    kept, num_kept = [], []
    parents, child_numbers, child_offsets = [], [], [0]
    for g in range(len(offsets) - 1):
        best = sorted(range(offsets[g], offsets[g + 1]), key=rank)[: keep[g]]
        kept.append(best + [-1] * (max_keep - len(best)))
        num_kept.append(len(best))
        for parent in best:
            parents += [parent] * children[g]
            child_numbers += list(range(children[g]))
        child_offsets.append(len(parents))

    # Children take their references first, then every candidate's table gives its own up, so
    # a block survives exactly when some child holds it. The first child inherits its parent's
    # partial last block; the others get a copy below.
    child_tables = []
    for parent, number in zip(parents, child_numbers, strict=True):
        table = used(parent) if number == 0 else tables[parent][: lens[parent] // block_size]
        for block in table:
            counts[block] += 1
        child_tables.append(table)
    top = _release(counts, stack, top, [b for i in range(len(tables)) for b in used(i)])

    child_lens, copies = [], []
    for table, parent, number in zip(child_tables, parents, child_numbers, strict=True):
        length = lens[parent]
        if number > 0 and length % block_size:
            if top == 0:  # no block for the copy: the child keeps its shared full blocks only
                flags |= POOL_EXHAUSTED
                length -= length % block_size
            else:
                top -= 1
                counts[stack[top]] = 1
                copies.append((tables[parent][length // block_size], stack[top]))
                table.append(stack[top])
        child_lens.append(length)
    _write_pool(ref_counts, free_stack, free_top, status, counts, stack, top, flags)

    width = block_tables.shape[1]
    slots = len(parents)
    int32 = dict(dtype=torch.int32, device=scores.device)
    copies += [(-1, -1)] * (num_copies - len(copies))
    return (
        torch.tensor(kept, **int32).reshape(len(kept), max_keep),
        torch.tensor(num_kept, **int32),
        torch.tensor(parents + [-1] * (num_slots - slots), **int32),
        torch.tensor(child_offsets, **int32),
        torch.tensor([t + [-1] * (width - len(t)) for t in child_tables]
                     + [[-1] * width] * (num_slots - slots), **int32).reshape(num_slots, width),
        torch.tensor(child_lens + [0] * (num_slots - slots), **int32),
        torch.tensor([src for src, _ in copies], **int32),
        torch.tensor([dst for _, dst in copies], **int32),
    )


def copy_blocks(k_cache, v_cache, src, dst):
    """Copy whole blocks ``src[i] -> dst[i]`` in every layer; a pair with a -1 is skipped.

    Caches ``[num_blocks, ...]`` (one layer) or ``[L, num_blocks, ...]``; modified in place.
    """
    for cache in (k_cache, v_cache):
        layers = cache if cache.dim() == 5 else cache.unsqueeze(0)
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            if s >= 0 and d >= 0:
                layers[:, d] = layers[:, s]


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
