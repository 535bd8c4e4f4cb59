"""Eager calls of the ops skip the custom-op dispatch (``ops.dispatch.run``); the custom ops stay what
torch.compile traces. Running the same work through the custom ops, their registered bodies
and schemas, must give the same results, element for element."""

from __future__ import annotations

import pytest
import torch

import ttscale
from ttscale import ops
from ttscale.ops import dispatch
from ttscale.ops.cascade_decode import _cascade_decode_attention
from ttscale.ops.copy_blocks import _copy_blocks
from ttscale.ops.merge import _merge_attention_states
from ttscale.ops.paged_prefill import _paged_prefill_attention
from ttscale.ops.prm_step_scores import _prm_step_scores
from ttscale.ops.sample import _sample
from ttscale.ops.select_and_fork import _select_and_fork
from ttscale.ops.write_kv import _write_kv
from ttscale.sampling_params import SamplingParams
from ttscale.toy import policy_dir, prm_dir, task

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread, restored

CUSTOM_OPS = {
    "cascade_decode_attention": _cascade_decode_attention,
    "paged_prefill_attention": _paged_prefill_attention,
    "merge_attention_states": _merge_attention_states,
    "write_kv": _write_kv,
    "prm_step_scores": _prm_step_scores,
    "select_and_fork": _select_and_fork,
    "copy_blocks": _copy_blocks,
    "sample": _sample,
}
EAGER = dispatch.run


@pytest.fixture
def through_custom_ops(monkeypatch):
    """Route every op through its custom op; returns the set of the names of the ops called."""
    called: set[str] = set()

    def run(op, name, *args):
        assert op is CUSTOM_OPS[name]
        called.add(name)
        return op(*args)

    monkeypatch.setattr(dispatch, "run", run)
    return called


def _search():
    texts = [f"Q: {p.text}" for p in task.problems("heldout", 4, seed=1)]
    llm = ttscale.LLM(policy_dir(), device="cpu", seed=0, kv_budget_bytes=32 << 20)
    prm = ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu", kv_budget_bytes=32 << 20)
    common = dict(step_delimiter=task.STEP_DELIMITER, prompt_fn=lambda q: q + "\n",
                  progress=False, seed=0, verifier=prm)
    beams = ttscale.beam_search(llm, texts, 4, beam_width=2,
                                sampling=SamplingParams(temperature=1.0, max_tokens=96), **common)
    chains = ttscale.revisions(llm, texts, 4, 2, sampling=SamplingParams(temperature=1.0,
                                                                          max_tokens=128), **common)
    return [[(c.text, c.step_scores) for c in r.candidates] for r in beams + chains]


def test_a_search_through_the_custom_ops_is_the_same(through_custom_ops, monkeypatch):
    through = _search()
    assert {"cascade_decode_attention", "paged_prefill_attention", "write_kv", "sample",
            "prm_step_scores", "select_and_fork"} <= through_custom_ops
    monkeypatch.setattr(dispatch, "run", EAGER)
    assert _search() == through


def test_copy_blocks_and_merge_through_the_custom_ops_are_the_same(through_custom_ops,
                                                                    monkeypatch):
    generator = torch.Generator().manual_seed(0)
    caches = [torch.randn(6, 4, 2, 8, generator=generator) for _ in range(2)]
    src, dst = torch.tensor([0, 2]), torch.tensor([5, 3])
    expected = [c.clone() for c in caches]
    for c in expected:
        c[dst] = c[src]
    ops.copy_blocks(*caches, src, dst, backend="cpu")
    assert all(torch.equal(c, e) for c, e in zip(caches, expected, strict=True))

    o_a, o_b = (torch.randn(5, 2, 8, generator=generator) for _ in range(2))
    lse_a, lse_b = (torch.randn(5, 2, generator=generator) for _ in range(2))
    merged = ops.merge_attention_states(o_a, lse_a, o_b, lse_b, backend="cpu")
    assert through_custom_ops == {"copy_blocks", "merge_attention_states"}
    monkeypatch.setattr(dispatch, "run", EAGER)
    direct = ops.merge_attention_states(o_a, lse_a, o_b, lse_b, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(merged, direct, strict=True))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("num_logprobs", [0, 2])
def test_sample_passes_opcheck(backend, num_logprobs):
    """The custom op's fake kernel describes what its kernel returns (torch.compile relies on
    it): shapes, dtypes and strides (the torch backend once returned a strided view of its
    sort as the top ids)."""
    rows, vocab = 4, 10
    args = (torch.randn(rows, vocab), torch.ones(rows), torch.zeros(rows, dtype=torch.int32),
            torch.ones(rows), torch.zeros(rows), 3, torch.zeros(rows, dtype=torch.int64),
            num_logprobs, backend)
    torch.library.opcheck(_sample, args)
