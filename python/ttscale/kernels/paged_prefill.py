"""Triton paged prefill attention: new tokens attend causally to their sequence's two-level context.

The packed query tokens ``[total_q]`` times the ``G`` query heads sharing a kv head form one
row space ``[total_q * G]`` per kv head, cut into tiles of ``BLOCK_M`` rows (flash attention's
query tile, with GQA's heads folded into it so each key block serves ``G`` heads). A tile may
hold the tail of one sequence and the head of the next; it runs one pass per sequence it
touches. A pass streams the sequence's context — its problem's prompt, then its own suffix, one
logical key range whose blocks come from either table — up to the tile's last query position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttscale.backends import new_output
from ttscale.kernels.paged import (
    LOG2E,
    block_d,
    dot_precision,
    finish,
    kv_rows,
    load_kv,
    softmax_step,
)


@triton.jit
def sequence_of(q_starts_ptr, token, num_seqs, search_steps):
    """The sequence whose packed rows hold ``token``: the last b with ``q_starts[b] <= token``."""
    lo = tl.zeros((), tl.int32)  # tensors from the start: the loop reassigns them
    hi = lo + num_seqs - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        below = tl.load(q_starts_ptr + mid) <= token
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    return lo


@triton.jit
def prefill_kernel(
    q_ptr, k_ptr, v_ptr, prompt_tables_ptr, prompt_lens_ptr, problem_ids_ptr,
    suffix_tables_ptr, suffix_lens_ptr, q_starts_ptr, out_ptr, lse_ptr,
    num_rows, num_seqs, search_steps, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_prompt_table, stride_suffix_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row = token.to(tl.int64) * stride_qt + head * stride_qh  # q and out share the layout
    q = tl.load(q_ptr + row[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    last_token = (tl.minimum(tile * BLOCK_M + BLOCK_M, num_rows) - 1) // GROUP
    first_seq = sequence_of(q_starts_ptr, tile * BLOCK_M // GROUP, num_seqs, search_steps)
    last_seq = sequence_of(q_starts_ptr, last_token, num_seqs, search_steps)
    for seq in range(first_seq, last_seq + 1):
        q_start = tl.load(q_starts_ptr + seq)
        q_end = tl.load(q_starts_ptr + seq + 1)
        mine = row_ok & (token >= q_start) & (token < q_end)
        if tl.sum(mine.to(tl.int32), 0) > 0:  # sequences with no new tokens have no rows
            problem = tl.load(problem_ids_ptr + seq)
            prompt_len = tl.load(prompt_lens_ptr + problem)
            context = prompt_len + tl.load(suffix_lens_ptr + seq)
            # The new tokens are the context's last ones; each sees keys up to its own position.
            position = context - q_end + token
            key_end = context - q_end + tl.minimum(q_end - 1, last_token) + 1
            prompt_table = prompt_tables_ptr + problem * stride_prompt_table
            suffix_table = suffix_tables_ptr + seq * stride_suffix_table
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for key in range(0, key_end, BLOCK_N):
                n = key + tl.arange(0, BLOCK_N)
                n_ok = n < key_end
                in_prompt = n < prompt_len
                # A block of keys may straddle the two levels: gather each key from its table.
                prompt_rows = kv_rows(prompt_table, n, n_ok & in_prompt, BLOCK_SIZE)
                suffix_rows = kv_rows(suffix_table, n - prompt_len, n_ok & ~in_prompt, BLOCK_SIZE)
                kv_row = tl.where(in_prompt, prompt_rows, suffix_rows)
                k, v = load_kv(k_ptr, v_ptr, kv_row, kv_head, n_ok, stride_kt, stride_kh, HEAD_DIM,
                               BLOCK_D)
                visible = n_ok[None, :] & (n[None, :] <= position[:, None])
                m_i, l_i, acc = softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale,
                                             DOT_PRECISION)
            out, lse = finish(m_i, l_i, acc)
            tl.store(out_ptr + row[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=mine[:, None] & d_ok[None, :])
            tl.store(lse_ptr + token.to(tl.int64) * (GROUP * tl.num_programs(1)) + head, lse,
                     mask=mine)


def paged_prefill_attention(q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids,
                            suffix_block_tables, suffix_lens, q_lens, scale, plan):
    """See :func:`ttscale.ops.paged_prefill_attention`."""
    total_q, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    num_seqs = q_lens.shape[0]
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((total_q, q_heads), torch.float32, q.device)
    if total_q == 0:
        return out, lse
    q_starts = torch.zeros(num_seqs + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(q_lens, 0, out=q_starts[1:])
    rows = total_q * group
    # Tiles about one sequence's rows tall: a tile spanning several sequences runs a pass each.
    block_m = min(128, max(16, triton.next_power_of_2(triton.cdiv(rows, num_seqs))))
    grid = (triton.cdiv(rows, block_m), kv_heads)
    prefill_kernel[grid](
        q, k_cache, v_cache, prompt_block_tables, prompt_lens, problem_ids, suffix_block_tables,
        suffix_lens, q_starts, out, lse, rows, num_seqs, num_seqs.bit_length(), scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2),
        prompt_block_tables.stride(0), suffix_block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=block_m, BLOCK_N=64,
        BLOCK_SIZE=block_size, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=8 if block_m >= 128 else 4,
    )
    return out, lse
