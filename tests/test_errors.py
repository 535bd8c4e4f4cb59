"""One error vocabulary: every bad input to the public API raises a ``TTScaleError`` whose
``param`` names the argument as the caller wrote it, and whose message names it too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ttscale
from ttscale.errors import InvalidArgument, TTScaleError
from ttscale.toy import policy_dir, prm_dir

PROBLEM = "Q: (88-5)-18\n"


@pytest.fixture(scope="module")
def llm(one_thread):
    return ttscale.LLM(policy_dir(), device="cpu", kv_budget_bytes=16 << 20)


@pytest.fixture(scope="module")
def prm():
    return ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu", kv_budget_bytes=16 << 20)


SP = ttscale.SamplingParams
SAMPLING = [
    (lambda: SP(n=0), "n"),
    (lambda: SP(n=True), "n"),
    (lambda: SP(n=2.0), "n"),
    (lambda: SP(temperature=-1), "temperature"),
    (lambda: SP(temperature="hot"), "temperature"),
    (lambda: SP(temperature=None), "temperature"),
    (lambda: SP(temperature=float("nan")), "temperature"),
    (lambda: SP(top_p=0), "top_p"),
    (lambda: SP(top_p="0.9"), "top_p"),
    (lambda: SP(top_k=-2), "top_k"),
    (lambda: SP(top_k=1.5), "top_k"),
    (lambda: SP(min_p=1.5), "min_p"),
    (lambda: SP(max_tokens=0), "max_tokens"),
    (lambda: SP(max_tokens="10"), "max_tokens"),
    (lambda: SP(seed=-1), "seed"),
    (lambda: SP(seed=1.5), "seed"),
    (lambda: SP(logprobs=21), "logprobs"),
    (lambda: SP(stop=7), "stop"),
    (lambda: SP(stop={"a": 1}), "stop"),
    (lambda: SP(stop=[""]), "stop"),
    (lambda: SP(ignore_eos="no"), "ignore_eos"),
]

CONSTRUCTION = [
    (lambda: ttscale.LLM(None), "model"),
    (lambda: ttscale.LLM(123), "model"),
    (lambda: ttscale.LLM("/no/such/model"), "model"),
    (lambda: ttscale.LLM(policy_dir(), device="tpu"), "device"),
    (lambda: ttscale.LLM(policy_dir(), device=3.5), "device"),
    (lambda: ttscale.LLM(policy_dir(), device="cuda") if not torch.cuda.is_available()
     else ttscale.LLM(policy_dir(), device="cuda:99"), "device"),
    (lambda: ttscale.LLM(policy_dir(), dtype="int8"), "dtype"),
    (lambda: ttscale.LLM(policy_dir(), block_size=0), "block_size"),
    (lambda: ttscale.LLM(policy_dir(), block_size=-16), "block_size"),
    (lambda: ttscale.LLM(policy_dir(), kv_budget_bytes=0), "kv_budget_bytes"),
    (lambda: ttscale.LLM(policy_dir(), memory_share=2), "memory_share"),
    (lambda: ttscale.LLM(policy_dir(), window=0), "window"),
    (lambda: ttscale.LLM(policy_dir(), seed=-5), "seed"),
    (lambda: ttscale.PRM(prm_dir(), format="nope", device="cpu"), "format"),
]


def generating(llm):
    return [
        (lambda: llm.generate(None), "prompts"),
        (lambda: llm.generate(42), "prompts"),
        (lambda: llm.generate([]), "prompts"),
        (lambda: llm.generate([[[1, 2]]]), "prompts"),
        (lambda: llm.generate(["Q", None]), "prompts"),
        (lambda: llm.generate(""), "prompts"),
        (lambda: llm.generate([1.7, 5.2]), "prompts"),
        (lambda: llm.generate([True, False]), "prompts"),
        (lambda: llm.generate([[1, 2], [3, 10**6]]), "prompts"),
        (lambda: llm.generate(np.array([1.5, 2.5])), "prompts"),
        (lambda: llm.generate(PROBLEM, "greedy"), "sampling_params"),
        (lambda: llm.generate(PROBLEM, SP(max_tokens=10**6)), "max_tokens"),
        (lambda: llm.add_request(None), "prompt"),
        (lambda: llm.add_request(PROBLEM, params=3), "params"),
        (lambda: llm.add_request(PROBLEM, request_id=7), "request_id"),
        (lambda: llm.abort("no-such-request"), "request_id"),
    ]


def searching(llm, prm):
    common = dict(prompt_fn=lambda p: p, step_delimiter="\n", progress=False)
    return [
        (lambda: ttscale.best_of_n(llm, [PROBLEM], 0, verifier=prm, **common), "n"),
        (lambda: ttscale.best_of_n(llm, [PROBLEM], 4, verifier=prm, select="nope", **common), "select"),
        (lambda: ttscale.best_of_n(llm, [PROBLEM], 4, verifier=prm, agg="nope", **common), "agg"),
        (lambda: ttscale.best_of_n(llm, [PROBLEM], 4, verifier=prm, seed=-1, **common), "seed"),
        (lambda: ttscale.best_of_n(llm, PROBLEM, 4, verifier=prm, **common), "problems"),
        (lambda: ttscale.beam_search(llm, [PROBLEM], 6, verifier=prm, beam_width=4, **common), "beam_width"),
        (lambda: ttscale.beam_search(llm, [PROBLEM], 8, verifier=None, **common), "verifier"),
        (lambda: ttscale.revisions(llm, [PROBLEM], 4, 3, verifier=prm, **common), "sequential"),
        (lambda: ttscale.best_of_n(llm, [PROBLEM], 4, problem_ids=[1, 2], **common), "problem_ids"),
        (lambda: ttscale.best_of_n(llm, [PROBLEM, PROBLEM], 4, problem_ids=[3, 3], **common), "problem_ids"),
        (lambda: ttscale.best_of_n(llm, [PROBLEM], 4, problem_ids=[-1], **common), "problem_ids"),
    ]


def check(call, param):
    with pytest.raises(TTScaleError) as caught:
        call()
    error = caught.value
    assert isinstance(error, InvalidArgument) and isinstance(error, ValueError)
    assert error.param == param, (error.param, str(error))
    assert param in str(error), str(error)


@pytest.mark.parametrize("row", range(len(SAMPLING)))
def test_sampling_params(row):
    check(*SAMPLING[row])


@pytest.mark.parametrize("row", range(len(CONSTRUCTION)))
def test_construction(row):
    check(*CONSTRUCTION[row])


@pytest.mark.parametrize("row", range(16))
def test_generation(llm, row):
    check(*generating(llm)[row])


@pytest.mark.parametrize("row", range(11))
def test_strategies(llm, prm, row):
    check(*searching(llm, prm)[row])


def test_the_engine_keeps_serving_after_bad_inputs(llm):
    for call, _ in generating(llm):
        with pytest.raises(TTScaleError):
            call()
    (out,) = llm.generate(PROBLEM, SP(temperature=0, max_tokens=60), use_tqdm=False)
    assert out.outputs[0].text == "88-5=83\n83-18=65\nanswer: 65\n"
    assert not llm.has_unfinished_requests()


@pytest.mark.parametrize("strategy", ["best_of_n", "beam_search"])
def test_a_verifier_that_raises_fails_its_search_only(llm, prm, strategy, monkeypatch):
    """The search fails with the verifier's error; every KV block it took (policy and PRM) goes
    back, and the next search gives what it gives on fresh engines."""
    common = dict(verifier=prm, prompt_fn=lambda p: p, step_delimiter="\n", progress=False, seed=3,
                  sampling=SP(temperature=1.0, max_tokens=60))
    extra = {"beam_width": 2} if strategy == "beam_search" else {}
    search = getattr(ttscale, strategy)
    expected = [r.answer for r in search(llm, [PROBLEM, "Q: (12+7)*3\n"], 4, **common, **extra)]
    calls, score = [], prm.score

    def flaky(paths, steps, final):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the PRM's device fell over")
        return score(paths, steps, final)

    monkeypatch.setattr(prm, "score", flaky)
    with pytest.raises(RuntimeError, match="fell over"):
        search(llm, [PROBLEM, "Q: (12+7)*3\n"], 4, **common, **extra)
    monkeypatch.undo()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    assert prm.engine.blocks.num_free == prm.engine.blocks.num_blocks
    assert [r.answer for r in search(llm, [PROBLEM, "Q: (12+7)*3\n"], 4, **common, **extra)] == expected
