"""The decode step's elementwise work, each op as the model computes it unfused (model/):
residual add with RMSNorm, rotary embedding with the K/V write, and the gated MLP's SiLU."""

from __future__ import annotations

import torch

from ttscale.reference.kv_cache import write_kv


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
