"""CPU matrix products on oneDNN-packed weights compute what F.linear computes on the dense ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from paged import assert_close
from tiny_models import PagedDriver, Sequence, build_hf_model

from ttscale.model import cpu_linear, load_model
from ttscale.model.transformer import Linear

needs_onednn = pytest.mark.skipif(
    not cpu_linear.packing_available(torch.float32), reason="this torch has no oneDNN linear ops"
)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Qwen2: qkv bias and untied embeddings, so both biased and bias-free products run.
    The transformers model and the folder it was saved to."""
    directory = tmp_path_factory.mktemp("qwen2")
    return build_hf_model("qwen2", directory), directory


@pytest.fixture(scope="module")
def qwen2_dir(qwen2):
    return qwen2[1]


def _unpack(model) -> None:
    for module in model.modules():
        if isinstance(module, Linear):
            module.packed = None
    model.lm_head_packed = None


def _prompt_then_decode(model) -> torch.Tensor:
    driver = PagedDriver(model)
    prompt = torch.randint(0, 256, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    problem, prompt_logits = driver.add_prompt(prompt)
    step_logits = driver.decode([Sequence(problem), Sequence(problem)], [4, 9])
    return torch.cat([prompt_logits, step_logits])


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_on_the_cpu_packs_every_matrix(qwen2_dir, dtype):
    if not cpu_linear.packing_available(dtype):
        pytest.skip(f"oneDNN cannot run {dtype} here")
    model = load_model(qwen2_dir, dtype=dtype)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is not None for m in linears)
    assert model.lm_head_packed is not None


@needs_onednn
def test_packed_model_computes_the_logits_of_the_dense_one(qwen2_dir):
    model = load_model(qwen2_dir, dtype="float32")
    packed = _prompt_then_decode(model)
    _unpack(model)
    assert_close(packed, _prompt_then_decode(model), torch.float32, "logits")


@needs_onednn
@pytest.mark.parametrize("rows", [0, 1, 5, 33])
def test_packed_linear_equals_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    x = torch.randn(rows, 40, generator=gen)
    packed = cpu_linear.pack(weight)
    assert_close(cpu_linear.linear(x, packed, bias), F.linear(x, weight, bias), torch.float32, "y")
    assert_close(cpu_linear.linear(x, packed, None), F.linear(x, weight), torch.float32, "y")


def test_weights_that_cannot_be_packed_stay_on_f_linear():
    assert cpu_linear.pack(torch.randn(4, 8, dtype=torch.float16)) is None
    assert cpu_linear.pack(torch.randn(4, 8, device="meta")) is None
    assert cpu_linear.pack(torch.randn(2, 4, 8)) is None


def test_without_onednn_the_model_runs_on_f_linear(qwen2, monkeypatch):
    hf_model, directory = qwen2
    monkeypatch.setattr(cpu_linear, "packing_available", lambda dtype: False)
    model = load_model(directory, dtype="float32")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed is None for m in linears) and model.lm_head_packed is None
    # each product is F.linear's, bit for bit
    gen = torch.Generator().manual_seed(21)
    for module in linears:
        x = torch.randn(5, module.weight.shape[1], generator=gen)
        assert torch.equal(module(x), F.linear(x, module.weight, module.bias))
    # and the whole model computes transformers' logits: the prompt's, then one step of each
    # sequence (tokens 4 and 9 after the prompt)
    ours = _prompt_then_decode(model)
    prompt = torch.randint(0, 256, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        theirs = torch.cat([hf_model(torch.tensor([prompt])).logits[0]]
                           + [hf_model(torch.tensor([prompt + [t]])).logits[0, -1:] for t in (4, 9)])
    assert_close(ours, theirs, torch.float32, "logits")


@needs_onednn
def test_moving_or_converting_the_model_drops_the_packs(qwen2_dir):
    model = load_model(qwen2_dir, dtype="float32")
    expected = _prompt_then_decode(model)
    model.to(torch.float64).to(torch.float32)
    assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))
    assert model.lm_head_packed is None
    assert_close(_prompt_then_decode(model), expected, torch.float32, "logits")
    model.pack_weights()
    assert_close(_prompt_then_decode(model), expected, torch.float32, "logits")
