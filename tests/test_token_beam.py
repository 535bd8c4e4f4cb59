"""``LLM.beam_search`` against a brute-force beam search in plain torch over transformers' model.

The reference recomputes every beam's whole sequence each step (no KV cache, no forks), keeps the
``beam_width`` best of each beam's top ``2 × beam_width`` continuations by cumulative
log-probability, sets aside those ending in EOS, and ranks the end as vLLM does:
cumulative / (prompt + generated, less a final EOS) ** length_penalty.
"""

from __future__ import annotations

import json
import shutil
import zlib

import pytest
import torch
from tiny_models import build_tiny_llama

import ttscale
from ttscale import BeamSearchOutput, BeamSearchParams, InvalidArgument
from ttscale.llm import LLM

BLOCK = 8  # small blocks: beams cross block boundaries and fork partly filled blocks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_beam_search(model, prompt, width, steps, eos, ignore_eos, length_penalty):
    beams, finished = [([], 0.0)], []
    for _ in range(steps):
        candidates = []
        for tokens, cumulative in beams:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[0, -1]
            top = torch.log_softmax(logits.double(), -1).topk(2 * width)
            for logprob, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                entry = (tokens + [token], cumulative + logprob)
                (finished if token in eos and not ignore_eos else candidates).append(entry)
        beams = sorted(candidates, key=lambda c: c[1], reverse=True)[:width]

    def score(entry):
        tokens, cumulative = entry
        length = len(prompt) + len(tokens) - (tokens[-1] in eos and not ignore_eos)
        return cumulative / length**length_penalty

    return sorted(finished + beams, key=score, reverse=True)[:width]


def random_prompts(name: str, lengths, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def assert_matches(outputs, expected):
    assert [s.token_ids for s in outputs.sequences] == [tokens for tokens, _ in expected]
    got = [s.cumulative_logprob for s in outputs.sequences]
    assert got == pytest.approx([c for _, c in expected], abs=1e-4)


@pytest.mark.parametrize("width", [1, 3])
def test_equals_brute_force_beam_search(model_dir, hf_model, width):
    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=BLOCK)
    prompts = random_prompts(f"beam-{width}", [5, 13], hf_model.config.vocab_size)
    free = llm.engine.pool.refresh()
    params = BeamSearchParams(beam_width=width, max_tokens=7, ignore_eos=True)
    outputs = llm.beam_search(prompts, params)
    assert all(isinstance(o, BeamSearchOutput) for o in outputs)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.prompt_token_ids == prompt
        assert_matches(out, reference_beam_search(hf_model, prompt, width, 7, set(), True, 1.0))
        assert all(len(s.token_ids) == 7 and s.finish_reason == "length" for s in out.sequences)
    assert llm.engine.pool.refresh() == free  # every beam and prompt block went back


def test_eos_finishes_beams_ranked_with_the_length_penalty(model_dir, hf_model, tmp_path):
    """EOS set to a token that shows among the first step's candidates, so that finished beams
    compete with live ones; a length penalty of 0.5 ranks them."""
    prompt = random_prompts("beam-eos", [9], hf_model.config.vocab_size)[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0, -1]
    eos = int(logits.topk(3).indices[2])  # a likely token, but not the likeliest
    directory = tmp_path / "eos_model"
    shutil.copytree(model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    llm = LLM(directory, kv_budget_bytes=4 << 20, block_size=BLOCK)
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=5,
                                                     length_penalty=0.5))[0]
    expected = reference_beam_search(hf_model, prompt, 2, 5, {eos}, False, 0.5)
    assert_matches(out, expected)
    assert any(s.finish_reason == "stop" and s.token_ids[-1] == eos for s in out.sequences)


def test_text_prompt_and_text(model_dir):
    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=BLOCK)
    out = llm.beam_search("12+7=", ttscale.BeamSearchParams(beam_width=2, max_tokens=4))[0]
    assert out.prompt == "12+7=" and out.prompt_token_ids == llm.encode("12+7=")
    assert len(out.sequences) == 2
    for seq in out.sequences:
        assert seq.text == llm.tokenizer.decode(seq.token_ids)
    scores = [s.cumulative_logprob / (len(out.prompt_token_ids) + len(s.token_ids)
                                      - (s.finish_reason == "stop")) for s in out.sequences]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("kwargs,param", [
    ({"beam_width": 0}, "beam_width"), ({"beam_width": 11}, "beam_width"),
    ({"beam_width": 2.0}, "beam_width"), ({"max_tokens": 0}, "max_tokens"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"length_penalty": float("nan")}, "length_penalty"),
])
def test_bad_params_name_the_argument(kwargs, param):
    with pytest.raises(InvalidArgument) as info:
        BeamSearchParams(**kwargs)
    assert info.value.param == param


def test_bad_call_arguments_name_the_argument(model_dir):
    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=BLOCK)
    cases = [
        (([], None), "prompts"),
        (([[1, 2, 3]], {"beam_width": 2}), "params"),
        (([[1, 2, 10**6]], None), "prompts"),
        (([[1, 2, 3]], BeamSearchParams(max_tokens=10**6)), "max_tokens"),
    ]
    for (prompts, params), param in cases:
        with pytest.raises(InvalidArgument) as info:
            llm.beam_search(prompts, params)
        assert info.value.param == param, (prompts, params)
