"""Pieces shared by the paged attention kernels: key gathering and the online-softmax step.

Scores are kept in base-2 units (scaled by ``log2(e)``) so the kernels use ``exp2``/``log2``;
log-sum-exps leave the kernels as natural logs (times ``LN2``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # for the wrappers' scale
LN2 = tl.constexpr(0.6931471805599453)  # read inside kernels, so a compile-time constant


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two (masked), at least 16 for ``tl.dot``."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise run as tf32 on the GPU (10 mantissa bits), far outside the
    # fp32 tolerance; for 16-bit inputs the setting is ignored.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def kv_rows(table_ptr, positions, mask, BLOCK_SIZE: tl.constexpr):
    """Pool row (``block * BLOCK_SIZE + offset``) of each key position, through a block table."""
    block = tl.load(table_ptr + positions // BLOCK_SIZE, mask=mask, other=0)
    return block.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE


@triton.jit
def load_kv(k_ptr, v_ptr, rows, kv_head, mask, stride_kt, stride_kh, HEAD_DIM: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """K and V ``[BLOCK_N, BLOCK_D]`` of one kv head at the given pool rows (zeros where masked)."""
    d = tl.arange(0, BLOCK_D)
    offsets = rows[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
    full = mask[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + offsets, mask=full, other=0.0)
    v = tl.load(v_ptr + offsets, mask=full, other=0.0)
    return k, v


@triton.jit
def softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One block of keys into a running softmax (flash attention's online rescaling).

    q ``[M, D]``, k/v ``[N, D]``, visible broadcastable to ``[M, N]``; m_i/l_i ``[M]`` are the
    running max (base 2) and sum, acc ``[M, D]`` the unnormalised output, all float32.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; shift it by 0 so that exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def finish(m_i, l_i, acc):
    """Normalised output and natural-log lse of a running softmax; 0, -inf where it saw nothing."""
    seen = l_i > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    return out, lse
