"""Rotary position embedding: per-frequency angles, a cos/sin table per position, and its use.

The rotation pairs dimension ``i`` with ``i + D/2`` (the "rotate half" layout every HF checkpoint
of these families is stored in), not adjacent dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ttscale.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> Tensor:
    """``[D/2]`` float32 angle per position of each rotated pair, after the config's scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        return _llama3_scaling(inv_freq, rope)
    return inv_freq


def _llama3_scaling(inv_freq: Tensor, rope: RopeConfig) -> Tensor:
    """Llama 3.1's frequency-dependent scaling (its reference code, ``apply_scaling``).

    Frequencies whose wavelength is shorter than ``original / high_freq_factor`` are kept; those
    longer than ``original / low_freq_factor`` are divided by ``factor``; in between, the two are
    blended linearly in ``original / wavelength``.
    """
    original = rope.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    blend = (original / wavelength - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - blend) * inv_freq / rope.factor + blend * inv_freq
    scaled = torch.where(
        wavelength > original / rope.low_freq_factor, inv_freq / rope.factor, inv_freq
    )
    in_between = (wavelength >= original / rope.high_freq_factor) & (
        wavelength <= original / rope.low_freq_factor
    )
    return torch.where(in_between, blended, scaled)


def rotary_table(rope: RopeConfig, head_dim: int, max_positions: int, device=None) -> Tensor:
    """``[max_positions, D]`` float32: ``cos`` of each position's angles, then ``sin``.

    Each holds ``D/2`` columns; one table so one gather per step serves q and k of every layer.
    """
    inv_freq = inverse_frequencies(rope, head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)


def apply_rotary(x: Tensor, cos_sin: Tensor) -> Tensor:
    """Rotate ``x [T, H, D]`` by the per-token angles ``cos_sin [T, D]`` (rows of the table).

    Computed in float32 and returned in x's dtype.
    """
    half = x.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
