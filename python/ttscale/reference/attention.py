"""Attention over the paged KV cache, one sequence at a time: cascade decode (a prompt shared by
the problem's sequences, then the sequence's own suffix), paged prefill, and the log-sum-exp
merge of two partial attentions.

Caches ``[num_blocks, block_size, Hkv, D]``; a sequence's context is its problem's prompt blocks,
then its suffix blocks. Everything in float32; log-sum-exp values are natural logarithms.
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
