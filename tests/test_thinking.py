"""A thinking budget in ``SamplingParams`` and s1's budget forcing, enforced in the decode step
(``ttscale.engine.thinking``), against a step-by-step reference on transformers.

The reference decodes greedily one token at a time with transformers and applies the rules in
plain Python; the engine runs the same requests mixed in one batch, in windows of several steps,
so a forced end or continue text in the wrong place, a budget off by one, a state carried
wrongly across windows, stops or forks, or a forced token's log-probability all show as a
difference. Sampled runs check the bounds that hold for any draw.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_policy import save_tiny_policy

import ttscale
from ttscale.engine.engine import Engine
from ttscale.model import load_model, load_tokenizer
from ttscale.search import registry
from ttscale.toy.tokenizer import build_tokenizer

SP = ttscale.SamplingParams
EOS = build_tokenizer().token_to_id("</s>")
PROMPTS = ["Q: 12+3\n", "Q: 7*8-1\n", "Q: (4+5)*2\n"]
NEW = 40  # tokens each request generates (ignore_eos: every one runs to max_tokens)

# Settings in one batch: a budget alone, a multi-token end with a minimum and a multi-token
# continue text, a minimum without a budget, a budget of 0, the two at once, and no control.
# The token ids are ones this tiny model writes greedily (35, 14, 17 and 9 often).
SETTINGS = [
    dict(thinking_token_budget=10, thinking_end=[14]),
    dict(thinking_token_budget=12, thinking_end=[14, 15], min_thinking_tokens=8,
         continue_text=[40, 41, 42], max_extensions=3),
    dict(min_thinking_tokens=20, thinking_end=[35], continue_text=[9]),
    dict(thinking_token_budget=0, thinking_end=[17, 18]),
    dict(thinking_token_budget=6, min_thinking_tokens=6, thinking_end=[14],
         continue_text=[43, 27]),
    dict(min_thinking_tokens=30, thinking_end=[35], continue_text=[9, 9], max_extensions=1),
    dict(),
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="module")
def hf_model(policy):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(policy):
    return load_tokenizer(policy)


def reference(hf_model, prompt_ids, settings, new=NEW):
    """Greedy decoding with the thinking rules applied in Python, one transformers forward a
    token: the tokens, their log-probabilities, and where each continue text began (indices
    into the output)."""
    budget = settings.get("thinking_token_budget")
    least = settings.get("min_thinking_tokens", 0)
    end = settings.get("thinking_end", [EOS])
    cont = settings.get("continue_text", [])
    most = settings.get("max_extensions")
    controlled = budget is not None or least > 0
    ids, out, logprobs, continued = list(prompt_ids), [], [], []
    thinking, thought, extensions, queue = controlled, 0, 0, []
    for _ in range(new):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        sampled = int(logits.argmax())
        if thinking and budget is not None and thought >= budget:
            token, queue, thinking = end[0], list(end[1:]), False
        elif queue:
            token = queue.pop(0)
            thought += thinking
        elif thinking and sampled == end[0]:
            if thought < least and (most is None or extensions < most):
                token, queue = cont[0], list(cont[1:])
                extensions += 1
                thought += 1
                continued.append(len(out))
            else:
                token, queue, thinking = end[0], list(end[1:]), False
        else:
            token = sampled
            thought += thinking
        out.append(token)
        logprobs.append(float(logits[token]))
        ids.append(token)
    return out, logprobs, continued


def _llm(policy, **kw):
    return ttscale.LLM(policy, device="cpu", kv_budget_bytes=8 << 20, block_size=8, window=4, **kw)


def test_mixed_batch_matches_the_reference_token_for_token(one_thread, policy, hf_model, tokenizer):
    llm = _llm(policy)
    ids = {}
    for k, settings in enumerate(SETTINGS):
        params = SP(temperature=0, max_tokens=NEW, ignore_eos=True, **settings)
        ids[k] = llm.add_request(PROMPTS[k % len(PROMPTS)], params)
    outputs = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0]
    seqs = {}
    for k, settings in enumerate(SETTINGS):
        expected, logprobs, continued = reference(
            hf_model, tokenizer.encode(PROMPTS[k % len(PROMPTS)]), settings)
        got = outputs[ids[k]]
        assert got.token_ids == expected, settings
        assert got.cumulative_logprob == pytest.approx(sum(logprobs), abs=1e-3), settings
        seqs[k] = (continued, settings)
    # the references exercise what they should: a budget cut, continue texts, an extension limit
    assert any(c for c, _ in seqs.values())
    assert llm.stats().free_blocks == llm.stats().total_blocks  # the pool is empty again


def test_budget_holds_to_the_token_and_the_end_follows_at_once(one_thread, policy, hf_model,
                                                               tokenizer):
    """With the end of sequence as the end (the default on this tokenizer, which declares no
    </think>), a budget of B thinking tokens gives at most B tokens and then EOS, and the end
    appears exactly at B whenever the model did not end sooner."""
    llm = _llm(policy)
    budget = 9
    outs = llm.generate(PROMPTS, SP(n=16, temperature=1.0, max_tokens=30, seed=3,
                                    thinking_token_budget=budget), use_tqdm=False)
    cut = 0
    for out in outs:
        for c in out.outputs:
            assert c.token_ids[-1] == EOS and c.finish_reason == "eos"
            assert EOS not in c.token_ids[:-1]
            assert len(c.token_ids) - 1 <= budget
            cut += len(c.token_ids) - 1 == budget
    assert cut >= 8  # most samples of this model run past 9 tokens: the budget cut them
    assert llm.stats().free_blocks == llm.stats().total_blocks


def test_min_thinking_writes_the_continue_text_at_most_max_extensions_times(one_thread, policy):
    llm = _llm(policy)
    engine = llm.engine
    prompt = engine.add(llm.encode(PROMPTS[0]))
    seqs = engine.fork(prompt, 24)
    cont = engine.tokenizer.encode("ok\n", add_special_tokens=False)
    params = SP(temperature=1.0, max_tokens=60, seed=11, min_thinking_tokens=30,
                continue_text="ok\n", max_extensions=2)
    engine.decode(seqs, params)
    extended = 0
    for seq in seqs:
        trace = seq.thinking
        assert len(trace.continued_at) == trace.state.extensions <= 2
        for at in trace.continued_at:  # the continue text, token for token, where it is noted
            assert seq.tokens[at:at + len(cont)] == cont
        if seq.finish_reason == "eos":  # below the minimum only when out of extensions
            thought = len(seq.output_ids) - 1
            assert thought >= 30 or trace.state.extensions == 2
        extended += trace.state.extensions
    assert extended >= 10
    engine.free(seqs)
    engine.free_prompt(prompt)
    assert engine.pool.refresh() == engine.pool.num_blocks


def test_state_follows_stops_inside_a_window_and_forks(one_thread, policy, hf_model, tokenizer):
    """A search decodes to a delimiter (the window's later tokens are dropped) and forks: the
    thinking state must be the one of the last token kept, and a fork carries it on."""
    engine = Engine(load_model(policy), tokenizer, kv_budget_bytes=8 << 20, block_size=8,
                    window=4)
    settings = SETTINGS[1]
    params = SP(temperature=0, max_tokens=NEW, ignore_eos=True, **settings)
    prompt_ids = tokenizer.encode(PROMPTS[1])
    expected, _, _ = reference(hf_model, prompt_ids, settings)
    prompt = engine.add(prompt_ids)
    (seq,) = engine.fork(prompt, 1)
    stops = 0
    while seq.generated < 17:
        # "d" is a token the model writes, "+" the end text's first token (forced at 12)
        engine.decode([seq], params, stop=["d", "+"], max_new_tokens=17 - seq.generated)
        stops += seq.finish_reason == "stop"
    children = engine.fork(seq, 2)
    engine.decode(children, params)
    for child in children:
        assert child.output_ids == expected
    assert stops >= 3  # it did stop inside windows, and between the end text's two tokens
    engine.free([seq, *children])
    engine.free_prompt(prompt)


def test_a_seeded_request_is_the_same_alone_or_beside_others(one_thread, policy):
    params = SP(n=4, temperature=1.0, max_tokens=30, seed=5, thinking_token_budget=7,
                min_thinking_tokens=5, continue_text="ok", max_extensions=2)
    alone = _llm(policy).generate(PROMPTS[0], params, use_tqdm=False)[0]
    crowd = _llm(policy)
    crowd.add_request(PROMPTS[1], SP(n=3, temperature=1.0, max_tokens=25, seed=2,
                                     thinking_token_budget=3))
    crowd.add_request(PROMPTS[2], SP(n=2, max_tokens=20, seed=9))
    beside = crowd.generate(PROMPTS[0], params, use_tqdm=False)[0]
    assert [c.token_ids for c in beside.outputs] == [c.token_ids for c in alone.outputs]


def test_a_text_the_tokenizer_cannot_spell_is_named(one_thread, policy):
    llm = _llm(policy)
    with pytest.raises(ttscale.InvalidArgument) as caught:
        llm.add_request(PROMPTS[0], SP(min_thinking_tokens=3))  # "Wait": no W in the toy alphabet
    assert caught.value.param == "continue_text" and "Wait" in str(caught.value)
    with pytest.raises(ttscale.InvalidArgument) as caught:
        llm.generate(PROMPTS[0], SP(thinking_token_budget=3, thinking_end="</think>"))
    assert caught.value.param == "thinking_end"
    assert llm.stats().free_blocks == llm.stats().total_blocks


# ----------------------------------------------------------------------------------------------
# The strategy, on the embedded toy models


@pytest.fixture(scope="module")
def toy_llm():
    from ttscale.toy import policy_dir

    return ttscale.LLM(policy_dir(), device="cpu", kv_budget_bytes=256 << 20)


def _toy_problems(count):
    from ttscale.toy import task

    problems = task.problems("heldout", count, seed=0)
    return [f"Q: {p.text}" for p in problems], [str(p.answer) for p in problems]


TOY = dict(prompt_fn=lambda p: p + "\n", step_delimiter="\n", progress=False, seed=0,
           sampling=SP(temperature=1.0, max_tokens=96))


def test_more_thinking_is_more_accurate_on_the_toy_task(one_thread, toy_llm):
    texts, answers = _toy_problems(40)
    accuracy = {}
    for attempts in (1, 4):
        budget = 45 * attempts
        results = ttscale.budget_forcing(toy_llm, texts, 8, budget=budget, **TOY)
        accuracy[attempts] = sum(r.answer == a for r, a in zip(results, answers)) / len(texts)
        for r in results:  # each chain writes its budget and the end at most
            assert r.cost.generated_tokens <= 8 * (budget + 1)
    # measured 0.35 and 0.75 on 20 problems with 16 chains; loose bounds
    assert accuracy[4] >= accuracy[1] + 0.1 and accuracy[4] >= 0.45, accuracy


def test_every_finished_attempt_votes_and_no_cut_one_does(one_thread, toy_llm):
    from collections import Counter

    from ttscale.search.revisions import REVISION_SEPARATOR

    texts, _ = _toy_problems(6)
    results = ttscale.budget_forcing(toy_llm, texts, 4, budget=100, **TOY)
    for r in results:
        chains = {}
        for c in r.candidates:
            chains.setdefault(c.chain, []).append(c.position)
            assert REVISION_SEPARATOR not in c.text
            if not c.finished:
                assert c.answer is None
        assert sorted(chains) == list(range(4))
        assert all(positions == list(range(len(positions))) for positions in chains.values())
        votes = Counter(int(c.answer) for c in r.candidates if c.finished and c.answer)
        assert r.extra["attempts"] == sum(c.finished for c in r.candidates)
        if votes:
            top = max(votes.values())
            assert int(r.answer) in [a for a, v in votes.items() if v == top]


def test_a_prm_weighs_the_vote(one_thread, toy_llm):
    from ttscale.toy import prm_dir

    prm = ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu", kv_budget_bytes=64 << 20)
    texts, _ = _toy_problems(2)
    results = ttscale.budget_forcing(toy_llm, texts, 2, budget=60, verifier=prm, agg="min", **TOY)
    for r in results:
        finished = [c for c in r.candidates if c.finished and c.steps]
        assert finished and all(len(c.step_scores) == len(c.steps) for c in finished)
        assert r.cost.scored_tokens > 0


def test_declared_once_reachable_everywhere(tmp_path, capsys):
    from ttscale import cli, demo

    spec = registry.get("budget_forcing")
    assert ttscale.budget_forcing is spec.function and not spec.menu and not spec.needs_verifier
    assert spec.required() == ("budget",)
    assert {f.name for f in spec.flag_fields()} == {"budget", "min_thinking_tokens",
                                                    "max_extensions"}
    assert "budget_forcing" in demo.choices()
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "Q: 1+1", "answer": "2"}\n')
    from ttscale.toy import policy_dir

    argv = ["run", "--model", str(policy_dir()), "--strategy", "budget_forcing", "--n", "2",
            "--data", str(data), "--out", str(tmp_path / "out.jsonl"), "--device", "cpu",
            "--step-delimiter", "\\n"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and "--budget" in capsys.readouterr().err
    assert cli.main([*argv, "--budget", "30", "--max-extensions", "1"]) == 0
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 1


def test_the_demo_shows_four_budgets(one_thread, tmp_path):
    from ttscale import demo

    rows = demo.run_demo(ns=(2,), strategies=("budget_forcing",), num_problems=3, device="cpu",
                         out=tmp_path, progress=False)
    assert [r.strategy for r in rows] == [f"budget_forcing-{k}" for k in demo.FORCING_ATTEMPTS]
    tokens = [r.tokens for r in rows]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]


def test_the_server_takes_the_fields_and_the_strategy():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("openai")
    from test_serve import PROMPT, Server

    server = Server("--max-tokens", "64")
    try:
        client = server.client()
        r = client.completions.create(model="toy", prompt=PROMPT, max_tokens=60, temperature=0,
                                      extra_body={"thinking_token_budget": 5})
        assert r.usage.completion_tokens == 6  # five tokens, then the end of sequence forced
        assert r.choices[0].text == "88-5="
        r = client.completions.create(
            model="toy", prompt=PROMPT, max_tokens=90, temperature=0,
            extra_body={"min_thinking_tokens": 40, "continue_text": "\n# another try:\n",
                        "max_extensions": 1})
        assert r.choices[0].text.count("another try") == 1
        bad = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "toy", "prompt": PROMPT, "thinking_token_budget": -2})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "thinking_token_budget"
        bad = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "toy", "prompt": PROMPT, "min_thinking_tokens": 3})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_text"
        r = client.completions.create(
            model="toy", prompt=PROMPT, max_tokens=60,
            extra_body={"ttscale": {"strategy": "budget_forcing", "n": 4, "budget": 90}})
        extra = r.model_extra["ttscale"]
        assert extra["strategy"] == "budget_forcing" and extra["answer"] == "65"
        assert extra["cost"]["generated_tokens"] <= 4 * 91
    finally:
        server.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_with_cuda_graphs_the_mixed_batch_matches_the_reference(policy, hf_model,
                                                                         tokenizer):
    """With CUDA graphs on, a window with a thinking control runs the ungraphed loop and one
    without runs the captured step: both give the reference's tokens (float32, greedy)."""
    llm = ttscale.LLM(policy, device="cuda", dtype="float32", kv_budget_bytes=64 << 20,
                      block_size=16, window=4)
    assert llm.engine.runner.graphs is not None
    for k, settings in enumerate(SETTINGS):
        params = SP(temperature=0, max_tokens=NEW, ignore_eos=True, **settings)
        prompt = PROMPTS[k % len(PROMPTS)]
        got = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        expected, _, _ = reference(hf_model, tokenizer.encode(prompt), settings)
        assert got == expected, settings
