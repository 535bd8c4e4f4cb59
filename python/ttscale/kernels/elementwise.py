"""Triton kernels of the decode step's elementwise work, each one read of its inputs and one
write of its outputs, in the model's dtype with float32 arithmetic.

Unfused, a layer of the decode step runs a dozen small kernels around its matrix products
(the residual adds, RMSNorm's float32 copy, square, mean, rsqrt and two multiplies, RoPE's
float32 copies of q and k, the K/V scatter, SiLU and the gate multiply), each reading and
writing the whole activation. Fused:

- ``add_rms_norm``: one program per token row adds the residual, writes the sum (the next
  residual) and its RMSNorm;
- ``rope_write_kv``: one program per (token, head) rotates a q head into the output, or a k
  head straight into its cache slot beside the v head's copy;
- ``silu_mul``: one program per (token, block of the intermediate size).

The roundings follow :mod:`ttscale.reference.elementwise` (the sum and the normalised row are
rounded to the dtype before the weight multiplies, as the model's unfused code does); only the
float32 summation order of the norm and fused multiply-adds differ.
"""

from __future__ import annotations

import triton
import triton.language as tl
from ttscale.backends import new_output


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, hidden, eps,
    stride_x, stride_residual,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    residual = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0)
    summed = (residual.to(tl.float32) + x.to(tl.float32)).to(x.dtype)  # the stream's rounding
    tl.store(summed_ptr + row * hidden + offs, summed, mask=mask)
    s = summed.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(s * s, 0) / hidden + eps)
    normalised = (s * inv_rms).to(x.dtype)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = (weight.to(tl.float32) * normalised.to(tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * hidden + offs, out, mask=mask)


def add_rms_norm(x, residual, weight, eps):
    """See :func:`ttscale.ops.add_rms_norm`; rows of x and residual may be strided."""
    tokens, hidden = x.shape
    out = new_output((tokens, hidden), x.dtype, x.device)
    summed = new_output((tokens, hidden), x.dtype, x.device)
    if tokens == 0:
        return out, summed
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(tokens,)](
        x, residual, weight, out, summed, hidden, eps, x.stride(0), residual.stride(0),
        BLOCK=block, num_warps=min(16, max(1, block // 512)))
    return out, summed


@triton.jit
def _rotate_half(src_ptr, dst_ptr, cos, sin, offs, mask, HALF: tl.constexpr):
    """dst = src rotated: (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves of a head."""
    x1 = tl.load(src_ptr + offs, mask=mask, other=0.0)
    x2 = tl.load(src_ptr + HALF + offs, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(dst_ptr + offs, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(dst_ptr + HALF + offs, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_sin_ptr, slots_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    q_heads, kv_heads, stride_q, stride_k, stride_v,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < HALF
    cos = tl.load(cos_sin_ptr + token * HEAD_DIM + offs, mask=mask, other=0.0)
    sin = tl.load(cos_sin_ptr + token * HEAD_DIM + HALF + offs, mask=mask, other=0.0)
    if head < q_heads:
        _rotate_half(q_ptr + token * stride_q + head * HEAD_DIM,
                     q_out_ptr + (token * q_heads + head) * HEAD_DIM, cos, sin, offs, mask, HALF)
    else:
        kv_head = head - q_heads
        slot = tl.load(slots_ptr + token)
        if slot >= 0:  # -1: a padded row of a CUDA graph
            dst = (slot.to(tl.int64) * kv_heads + kv_head) * HEAD_DIM
            _rotate_half(k_ptr + token * stride_k + kv_head * HEAD_DIM, k_cache_ptr + dst,
                         cos, sin, offs, mask, HALF)
            v = v_ptr + token * stride_v + kv_head * HEAD_DIM
            tl.store(v_cache_ptr + dst + offs, tl.load(v + offs, mask=mask), mask=mask)
            tl.store(v_cache_ptr + dst + HALF + offs, tl.load(v + HALF + offs, mask=mask),
                     mask=mask)


def rope_write_kv(q, k, v, cos_sin, k_cache, v_cache, slots):
    """See :func:`ttscale.ops.rope_write_kv`; heads contiguous, token rows may be strided."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q_out = new_output((tokens, q_heads, head_dim), q.dtype, q.device)
    if tokens == 0:
        return q_out
    _rope_write_kv_kernel[(tokens, q_heads + kv_heads)](
        q, k, v, cos_sin, slots, q_out, k_cache, v_cache, q_heads, kv_heads,
        q.stride(0), k.stride(0), v.stride(0),
        HEAD_DIM=head_dim, HALF_BLOCK=triton.next_power_of_2(head_dim // 2), num_warps=1)
    return q_out


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inner, stride_gate_up, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    gate = tl.load(gate_up_ptr + token * stride_gate_up + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + token * stride_gate_up + inner + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * up.to(tl.float32)
    tl.store(out_ptr + token * inner + offs, out.to(gate.dtype), mask=mask)


def silu_mul(gate_up):
    """See :func:`ttscale.ops.silu_mul`; rows of gate_up may be strided."""
    tokens, width = gate_up.shape
    inner = width // 2
    out = new_output((tokens, inner), gate_up.dtype, gate_up.device)
    if tokens == 0 or inner == 0:
        return out
    block = min(1024, triton.next_power_of_2(inner))
    _silu_mul_kernel[(tokens, triton.cdiv(inner, block))](
        gate_up, out, inner, gate_up.stride(0), BLOCK=block, num_warps=4)
    return out

