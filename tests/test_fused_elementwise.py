"""The decode step's fused elementwise ops against their plain-torch references.

Outputs start poisoned (conftest sets TTSCALE_POISON), so an element a kernel leaves unwritten
fails the comparison. Triton runs interpreted here, where float32 to bfloat16 conversion
truncates instead of rounding to nearest: bfloat16 results are compared within the dtype's
tolerance, float32 ones tightly.
"""

from __future__ import annotations

import pytest
import torch
from paged import assert_close, backend_params
from ttscale import backends, ops, reference
from ttscale.errors import InvalidArgument

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(*shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 2).to(device, dtype)


@pytest.mark.parametrize("backend,device", backend_params("add_rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", [(1, 37), (5, 256), (3, 1000)], ids=str)
def test_add_rms_norm_matches_reference(backend, device, dtype, tokens, hidden):
    wide = _randn(tokens, hidden + 9, dtype=dtype, device=device, seed=hidden)
    x = wide[:, 9:]  # rows strided, as a view of a wider projection would be
    residual = _randn(tokens, hidden, dtype=dtype, device=device, seed=hidden + 1)
    weight = _randn(hidden, dtype=dtype, device=device, seed=hidden + 2)
    normed, summed = ops.add_rms_norm(x, residual, weight, 1e-6, backend=backend)
    ref_normed, ref_summed = reference.add_rms_norm(x, residual, weight, 1e-6)
    assert normed.is_contiguous() and summed.is_contiguous()
    assert_close(summed, ref_summed, dtype, "summed")
    assert_close(normed, ref_normed, dtype, "normed")


@pytest.mark.parametrize("backend,device", backend_params("add_rms_norm"))
def test_add_rms_norm_of_no_tokens(backend, device):
    x = torch.empty(0, 64, device=device)
    normed, summed = ops.add_rms_norm(x, x, torch.ones(64, device=device), 1e-5, backend=backend)
    assert normed.shape == summed.shape == (0, 64)


def _qkv(tokens, q_heads, kv_heads, head_dim, dtype, device, seed):
    """q, k and v as views of one projection ``[T, (Hq + 2 Hkv) D]``, as the model splits it."""
    sizes = [q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv = _randn(tokens, sum(sizes), dtype=dtype, device=device, seed=seed)
    q, k, v = qkv.split(sizes, dim=-1)
    return (q.view(tokens, q_heads, head_dim), k.view(tokens, kv_heads, head_dim),
            v.view(tokens, kv_heads, head_dim))


@pytest.mark.parametrize("backend,device", backend_params("rope_write_kv"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,q_heads,kv_heads,head_dim", [
    (1, 8, 1, 64),  # one token, a GQA group of 8
    (7, 2, 2, 6),  # group 1, a half of 3 (not a power of two)
    (4, 4, 2, 128),
], ids=str)
def test_rope_write_kv_matches_reference(backend, device, dtype, tokens, q_heads, kv_heads,
                                         head_dim):
    q, k, v = _qkv(tokens, q_heads, kv_heads, head_dim, dtype, device, seed=head_dim + tokens)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(1))
    angles = positions[:, None].float() * torch.rand(head_dim // 2) * 0.5
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)
    k_cache = _randn(3, 4, kv_heads, head_dim, dtype=dtype, device=device, seed=5)
    v_cache = _randn(3, 4, kv_heads, head_dim, dtype=dtype, device=device, seed=6)
    slots = torch.randperm(12, generator=torch.Generator().manual_seed(tokens))[:tokens]
    slots[tokens // 2] = -1  # a padded row: its K/V are not written
    slots = slots.to(device)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    q_rot = ops.rope_write_kv(q, k, v, cos_sin, k_cache, v_cache, slots, backend=backend)
    ref_q = reference.rope_write_kv(q, k, v, cos_sin, ref_k_cache, ref_v_cache, slots)
    assert q_rot.is_contiguous()
    assert_close(q_rot, ref_q, dtype, "q")
    assert_close(k_cache, ref_k_cache, dtype, "k_cache")
    assert torch.equal(v_cache, ref_v_cache)  # a copy: exact


@pytest.mark.parametrize("backend,device", backend_params("silu_mul"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,inner", [(1, 37), (3, 1100)], ids=str)
def test_silu_mul_matches_reference(backend, device, dtype, tokens, inner):
    wide = _randn(tokens, 2 * inner + 3, dtype=dtype, device=device, seed=inner)
    gate_up = wide[:, 3:]
    out = ops.silu_mul(gate_up, backend=backend)
    assert out.shape == (tokens, inner) and out.is_contiguous()
    assert_close(out, reference.silu_mul(gate_up), dtype, "silu_mul")


def test_silu_mul_reference_is_swiglu():
    gate_up = torch.randn(4, 10, dtype=torch.float64)
    want = torch.nn.functional.silu(gate_up[:, :5]) * gate_up[:, 5:]
    torch.testing.assert_close(reference.silu_mul(gate_up.float()).double(), want, rtol=1e-6,
                               atol=1e-6)


def test_errors_name_the_argument():
    x = torch.randn(2, 8)
    cases = [
        (lambda: ops.add_rms_norm(x, x, torch.ones(7), 1e-6), "weight"),
        (lambda: ops.add_rms_norm(x, x.double(), torch.ones(8), 1e-6), "residual"),
        (lambda: ops.add_rms_norm(x, x, torch.ones(8), 0.0), "eps"),
        (lambda: ops.silu_mul(torch.randn(2, 7)), "gate_up"),
        (lambda: ops.silu_mul(torch.randn(2, 8).long()), "gate_up"),
    ]
    q, k, v = torch.randn(3, 4, 6), torch.randn(3, 2, 6), torch.randn(3, 2, 6)
    cache = torch.zeros(2, 4, 2, 6)
    slots = torch.tensor([0, 1, 2])
    cases += [
        (lambda: ops.rope_write_kv(q, k, v, torch.randn(3, 5), cache, cache.clone(), slots),
         "cos_sin"),
        (lambda: ops.rope_write_kv(q, k, v, torch.randn(3, 6), cache, cache.clone(),
                                   torch.tensor([0, 1, 99])), "slots"),
        (lambda: ops.rope_write_kv(q[:, :, :5], k[:, :, :5], v[:, :, :5], torch.randn(3, 5),
                                   cache[..., :5].contiguous(), cache[..., :5].contiguous(),
                                   slots), "head_dim"),
        (lambda: ops.rope_write_kv(q[:2], k, v, torch.randn(3, 6), cache, cache.clone(), slots),
         "q"),
    ]
    for call, name in cases:
        with pytest.raises(InvalidArgument, match=name):
            call()


def test_the_model_fuses_only_where_its_step_runs_gpu_kernels():
    """The CPU's default and C++ kernels keep the model's unfused code (results unchanged);
    Triton steps (interpreted here) run the fused ops."""
    from ttscale.model.transformer import fuses_elementwise

    cpu = torch.device("cpu")
    assert not fuses_elementwise(None, cpu)
    assert not fuses_elementwise("cpu", cpu)
    assert not fuses_elementwise("torch", cpu)
    assert fuses_elementwise("triton", cpu) == ("triton" in backends.available("silu_mul", cpu))
