"""The Triton backend of the attention ops (``backends.MODULES`` points here).

The two paged attention kernels have files of their own (:mod:`ttscale.kernels.cascade_decode`,
:mod:`ttscale.kernels.paged_prefill`); the two elementwise ops are here. Arguments arrive
validated and contiguous from :mod:`ttscale.ops`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttscale.backends import new_output
from ttscale.kernels.cascade_decode import cascade_decode_attention
from ttscale.kernels.paged_prefill import paged_prefill_attention

__all__ = [
    "cascade_decode_attention",
    "paged_prefill_attention",
    "merge_attention_states",
    "write_kv",
]


@triton.jit
def merge_kernel(o_a_ptr, lse_a_ptr, o_b_ptr, lse_b_ptr, out_ptr, lse_ptr, num_rows,
                 HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (token, head) pairs
    row_ok = rows < num_rows
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    offsets = rows.to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
    lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=float("-inf"))
    lse_b = tl.load(lse_b_ptr + rows, mask=row_ok, other=float("-inf"))
    has_a = lse_a > float("-inf")
    has_b = lse_b > float("-inf")
    top = tl.maximum(lse_a, lse_b)
    seen = has_a | has_b
    top = tl.where(seen, top, 0.0)  # both empty: any finite shift, the weights are 0
    w_a = tl.exp(lse_a - top)
    w_b = tl.exp(lse_b - top)
    total = tl.where(seen, w_a + w_b, 1.0)
    lse = tl.where(seen, top + tl.log(total), float("-inf"))
    # An empty side's output may hold anything, NaN included: select, never multiply by 0.
    o_a = tl.load(o_a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    o_b = tl.load(o_b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    part_a = tl.where(has_a[:, None], (w_a / total)[:, None] * o_a, 0.0)
    part_b = tl.where(has_b[:, None], (w_b / total)[:, None] * o_b, 0.0)
    tl.store(out_ptr + offsets, (part_a + part_b).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    """See :func:`ttscale.ops.merge_attention_states`."""
    num_tokens, heads, head_dim = o_a.shape
    out = new_output(o_a.shape, o_a.dtype, o_a.device)
    lse = new_output(lse_a.shape, torch.float32, o_a.device)
    rows = num_tokens * heads
    if rows == 0:
        return out, lse
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(1, 4096 // block_d)  # about 4k elements a program
    merge_kernel[(triton.cdiv(rows, block_r),)](
        o_a, lse_a, o_b, lse_b, out, lse, rows, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d
    )
    return out, lse


@triton.jit
def write_kv_kernel(k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, slots_ptr, row_size,
                    BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token)
    if slot >= 0:  # -1: a padded row of a CUDA graph
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < row_size
        # A token's [Hkv, D] row is contiguous both in k/v and in the pool.
        src = token * row_size + offsets
        dst = slot.to(tl.int64) * row_size + offsets
        tl.store(k_cache_ptr + dst, tl.load(k_ptr + src, mask=mask), mask=mask)
        tl.store(v_cache_ptr + dst, tl.load(v_ptr + src, mask=mask), mask=mask)


def write_kv(k_cache, v_cache, k, v, slots):
    """See :func:`ttscale.ops.write_kv`."""
    num_tokens, kv_heads, head_dim = k.shape
    row_size = kv_heads * head_dim
    if num_tokens == 0:
        return
    block = min(4096, triton.next_power_of_2(row_size))
    write_kv_kernel[(num_tokens, triton.cdiv(row_size, block))](
        k_cache, v_cache, k, v, slots, row_size, BLOCK=block
    )
