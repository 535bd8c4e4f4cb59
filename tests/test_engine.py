"""The engine and LLM.generate on a tiny random Llama, against transformers and its own contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_llama

from ttscale.engine.engine import Engine
from ttscale.errors import PoolExhausted
from ttscale.llm import LLM
from ttscale.model import load_model, load_tokenizer
from ttscale.sampling_params import SamplingParams
from ttscale.toy.tokenizer import build_tokenizer

VOCAB = build_tokenizer().get_vocab_size()
EOS = build_tokenizer().token_to_id("</s>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture
def engine(model_dir):
    torch.set_num_threads(1)
    return Engine(load_model(model_dir), load_tokenizer(model_dir), kv_budget_bytes=4 << 20, block_size=8)


PROMPT = [1, 22, 23, 20, 18, 7, 14, 8, 19, 16, 6, 21, 7, 14, 8, 17, 11, 20, 3]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def test_greedy_continuation_equals_transformers(engine, hf_model):
    seq = engine.fork(engine.add(PROMPT), 1)[0]
    engine.decode([seq], GREEDY)
    expected = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert seq.output_ids == expected
    assert seq.finish_reason == "length" and seq.generated == 32


def test_greedy_logprobs_are_log_softmax_of_transformers_logits(engine, hf_model):
    seq = engine.fork(engine.add(PROMPT), 1)[0]
    engine.decode([seq], GREEDY, max_new_tokens=4)
    ids = torch.tensor([PROMPT + seq.output_ids])
    with torch.no_grad():
        logits = hf_model(ids).logits[0].log_softmax(-1)
    expected = [float(logits[len(PROMPT) - 1 + i, t]) for i, t in enumerate(seq.output_ids)]
    assert seq.logprobs == pytest.approx(expected, abs=1e-4)


def test_fork_continues_like_a_fresh_prefill(engine, hf_model):
    """A child forked mid-sequence sees exactly the KV its parent wrote."""
    parent = engine.fork(engine.add(PROMPT), 1)[0]
    engine.decode([parent], GREEDY, max_new_tokens=5)
    children = engine.fork(parent, 3)
    engine.decode(children, GREEDY, max_new_tokens=7)
    expected = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    for child in children:
        assert child.output_ids == expected
    engine.free([parent, *children])


def test_copy_on_write_copies_every_layer_in_one_ops_call(engine, hf_model, monkeypatch):
    """Children that write into their parent's half-full block get copies of it, made by one
    ``ops.copy_blocks`` call over the whole pool, and decode as a fresh prefill would."""
    from ttscale import ops

    calls = []
    real = ops.copy_blocks

    def counting(k, v, src, dst, **kw):
        calls.append((k.dim(), src.tolist(), dst.tolist()))
        return real(k, v, src, dst, **kw)

    monkeypatch.setattr(ops, "copy_blocks", counting)
    parent = engine.fork(engine.add(PROMPT), 1)[0]
    engine.decode([parent], GREEDY, max_new_tokens=3)  # 19 + 3 tokens: the third block half full
    children = engine.fork(parent, 2)
    engine.decode(children, GREEDY, max_new_tokens=4)
    assert [dim for dim, _, _ in calls] == [5] * len(calls) and calls
    copies = [(s, d) for _, src, dst in calls for s, d in zip(src, dst, strict=True)]
    assert len({d for _, d in copies}) == len(copies) >= 1
    expected = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=7, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert all(child.output_ids == expected for child in children)
    engine.free([parent, *children])


def test_seeded_sample_is_the_same_alone_or_in_a_batch(model_dir):
    params = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=7)
    alone = Engine(load_model(model_dir), kv_budget_bytes=4 << 20, block_size=8)
    seq = alone.fork(alone.add(PROMPT), 1)[0]
    alone.decode([seq], params)
    crowd = Engine(load_model(model_dir), kv_budget_bytes=16 << 20, block_size=8)
    others = crowd.add([1, 5, 6, 7, 8, 9])
    seqs = crowd.fork(crowd.add(PROMPT), 64)
    distractors = crowd.fork(others, 8)
    crowd.decode(distractors[:3] + seqs + distractors[3:], params)
    assert seqs[0].output_ids == seq.output_ids
    assert len({tuple(s.output_ids) for s in seqs}) > 32  # the 64 samples differ from one another


def test_prompt_kv_is_stored_once(engine):
    prompt = engine.add(PROMPT + PROMPT)
    used_by_prompt = engine.pool.num_blocks - engine.pool.refresh()
    one = engine.fork(prompt, 1)
    engine.decode(one, GREEDY, max_new_tokens=10)
    used_n1 = engine.pool.num_blocks - engine.pool.refresh()
    many = engine.fork(prompt, 64)
    engine.decode(many, GREEDY, max_new_tokens=10)
    used_n65 = engine.pool.num_blocks - engine.pool.refresh()
    suffix_blocks = engine.pool.blocks_for(10)  # the prompt's last token + 9 fed samples
    assert used_n1 - used_by_prompt == suffix_blocks
    assert used_n65 - used_n1 == 64 * suffix_blocks


def test_stop_fires_on_the_delimiter_token(engine, model_dir):
    tok = load_tokenizer(model_dir)
    newline = tok.token_to_id("\n")
    seqs = engine.fork(engine.add(PROMPT), 8)
    engine.decode(seqs, SamplingParams(temperature=1.0, max_tokens=200, seed=1), stop=["\n"])
    for seq in seqs:
        assert seq.finish_reason in ("stop", "eos", "length")
        if seq.finish_reason == "stop":
            assert seq.tokens[-1] == newline and newline not in seq.output_ids[:-1]
            assert seq.kv_len == len(seq.tokens) - 1  # the stop token is pending, not yet in KV


def test_generate_returns_n_completions_per_prompt(model_dir):
    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=8)
    outs = llm.generate(["Q: 1+2\n", "Q: (3*4)-5\n"], SamplingParams(n=5, temperature=0.8, max_tokens=16, seed=3),
                        use_tqdm=False)
    assert len(outs) == 2 and all(len(o.outputs) == 5 for o in outs)
    for o in outs:
        for k, c in enumerate(o.outputs):
            assert c.index == k and len(c.token_ids) <= 16 and c.text == llm.tokenizer.decode(c.token_ids)
            assert c.cumulative_logprob <= 0


def test_generate_streams_through_a_small_pool(model_dir):
    """More samples than the pool holds at once: all complete, nothing leaks."""
    llm = LLM(model_dir, kv_budget_bytes=1 << 18, block_size=8)
    num_blocks = llm.engine.pool.num_blocks
    params = SamplingParams(n=40, temperature=1.0, max_tokens=30, ignore_eos=True, seed=0)
    assert 40 * llm.engine.pool.blocks_for(31) > num_blocks  # it cannot all fit at once
    outs = llm.generate([PROMPT, PROMPT[:7]], params, use_tqdm=False)
    assert all(len(c.token_ids) == 30 for o in outs for c in o.outputs)
    assert llm.engine.pool.refresh() == num_blocks


def test_a_sequence_that_can_never_fit_is_an_error_naming_numbers(model_dir):
    llm = LLM(model_dir, kv_budget_bytes=1 << 16, block_size=8)
    with pytest.raises(ValueError, match=r"max_tokens: one sequence of 400 tokens needs \d+ KV blocks, the pool has \d+"):
        llm.generate([PROMPT], SamplingParams(max_tokens=400), use_tqdm=False)


def test_decode_without_room_names_the_numbers(model_dir):
    engine = Engine(load_model(model_dir), kv_budget_bytes=1 << 16, block_size=8)
    seqs = engine.fork(engine.add(PROMPT), 2)
    with pytest.raises(PoolExhausted, match="free KV blocks"):
        engine.decode(seqs, SamplingParams(max_tokens=500, ignore_eos=True, temperature=0))


def test_bad_prompt_tokens_are_named(engine):
    with pytest.raises(ValueError, match=r"prompts\[0\]: token id 999 outside the vocabulary"):
        engine.add([1, 999])
    with pytest.raises(ValueError, match=r"prompts\[0\]: empty prompt"):
        engine.add([])


def test_extend_then_decode_prefills_the_appended_tokens(engine, hf_model):
    seq = engine.fork(engine.add(PROMPT), 1)[0]
    engine.decode([seq], GREEDY, max_new_tokens=3)
    engine.extend(seq, [22, 23, 20])
    engine.decode([seq], GREEDY, max_new_tokens=4)
    context = PROMPT + seq.output_ids[:6]
    expected = hf_model.generate(torch.tensor([context]), max_new_tokens=4, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(context):].tolist()
    assert seq.output_ids[6:] == expected


def test_select_and_fork_keeps_the_best_and_frees_the_rest(engine, hf_model):
    prompts = [engine.add(PROMPT), engine.add(PROMPT[:9])]
    cands = engine.fork(prompts[0], 3) + engine.fork(prompts[1], 2)
    engine.decode(cands, SamplingParams(temperature=1.0, max_tokens=6, seed=2, ignore_eos=True))
    before = [list(c.tokens) for c in cands]
    kids, parents, offsets = engine.select_and_fork(cands, [0.1, 0.9, 0.5, 0.3, 0.2], [3, 2], keep=1, children=2)
    assert parents == [1, 1, 3, 3] and offsets == [0, 2, 4]
    assert kids[0] is cands[1] and kids[2] is cands[3]  # a kept candidate carries on as its first child
    assert [c.freed for c in cands] == [True, False, True, False, True]
    engine.pool.check([p.row for p in prompts] + [k.row for k in kids])
    for kid, p in zip(kids, parents):
        assert kid.tokens == before[p]
    # The children continue exactly as a fresh prefill of their context would.
    engine.decode(kids[:1], GREEDY, max_new_tokens=5)
    context = PROMPT + kids[0].output_ids[:6]
    expected = hf_model.generate(torch.tensor([context]), max_new_tokens=5, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(context):].tolist()
    assert kids[0].output_ids[6:] == expected
    engine.free(kids)
    for p in prompts:
        engine.free_prompt(p)
    assert engine.pool.refresh() == engine.pool.num_blocks


def test_a_seeded_generate_call_repeats(model_dir):
    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=8)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=20, ignore_eos=True, seed=42)
    def draw():
        outs = llm.generate([PROMPT, PROMPT[:9]], params, use_tqdm=False)
        return [c.token_ids for o in outs for c in o.outputs]

    first, again = draw(), draw()
    assert first == again
    assert len({tuple(t) for t in first}) == 6


def _greedy_text(llm, prompt, max_tokens=40):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)
    return out[0].outputs[0].text


@pytest.mark.parametrize("kind", ["into_the_prompt", "longer_than_eight_tokens"])
def test_stop_strings_match_the_generated_text_only(model_dir, kind):
    """A stop string that would match only with the prompt's last character does not fire; one
    of 12 characters (12 tokens of the character tokenizer) does, and the text is cut there."""
    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=8)
    prompt = "Q: (3*4)-5\n"
    text = _greedy_text(llm, prompt)
    stop = "\n" + text[0] if kind == "into_the_prompt" else text[5:17]
    assert len(stop) == (2 if kind == "into_the_prompt" else 12)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=stop)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    cut = text.find(stop)
    assert (out.text, out.finish_reason) == ((text[:cut], "stop") if cut >= 0 else (text, "length"))


def test_generate_checks_every_prompt_before_any_work(model_dir):
    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=8)
    blocks = llm.engine.pool
    with pytest.raises(ValueError, match=r"prompts\[1\]: token id 999 outside the vocabulary"):
        llm.generate([PROMPT, [1, 5, 999]], SamplingParams(max_tokens=5), use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty prompt"):
        llm.generate([PROMPT, []], SamplingParams(max_tokens=5), use_tqdm=False)
    with pytest.raises(ValueError, match=r"max_tokens: prompts\[0\] has 19 tokens, so at most "
                                         r"494 new tokens fit the model's 512 positions, got 600"):
        llm.generate([PROMPT], SamplingParams(max_tokens=600), use_tqdm=False)
    small = LLM(model_dir, kv_budget_bytes=1 << 16, block_size=8)
    long_prompt = (PROMPT * 12)[:200]
    with pytest.raises(ValueError, match=r"prompts\[1\]: its prompt and one sample of "
                                         r"max_tokens=100 need \d+ KV blocks, the pool has 16"):
        small.generate([PROMPT, long_prompt], SamplingParams(max_tokens=100), use_tqdm=False)
    assert blocks.refresh() == blocks.num_blocks and small.engine.pool.refresh() == 16


def test_a_failed_generate_call_frees_its_blocks(model_dir, monkeypatch):
    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=8)
    blocks, decode_window = llm.engine.pool, llm.engine.runner.decode_window
    calls = []

    def failing_window(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return decode_window(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "decode_window", failing_window)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate([PROMPT, PROMPT[:7]], SamplingParams(n=4, max_tokens=30, ignore_eos=True),
                     use_tqdm=False)
    blocks.refresh()  # stats() reports the figures of the pool's last read
    assert llm.stats().free_blocks == blocks.num_blocks  # free, or held by the prefix cache alone
    llm.scheduler.cache.clear()
    assert blocks.refresh() == blocks.num_blocks
    monkeypatch.undo()
    outs = llm.generate([PROMPT], SamplingParams(n=2, max_tokens=5), use_tqdm=False)  # still usable
    assert len(outs[0].outputs) == 2


def test_stop_strings_without_a_tokenizer_are_named(model_dir, tmp_path):
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, tmp_path / name)
    llm = LLM(tmp_path, kv_budget_bytes=4 << 20, block_size=8)
    with pytest.raises(ValueError, match="sampling_params: stop strings need a tokenizer.json"):
        llm.generate([PROMPT], SamplingParams(max_tokens=5, stop="\n"), use_tqdm=False)


def test_tensor_and_array_prompts_are_token_ids(model_dir):
    import numpy as np

    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def ids(prompts):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    want = ids([PROMPT])
    assert ids(torch.tensor(PROMPT)) == want and ids(np.array(PROMPT)) == want
    assert ids(torch.tensor([PROMPT, PROMPT])) == want * 2


def test_stream_keys_number_a_prompts_sequences_on_their_own(engine):
    from ttscale.engine.engine import MAX_STREAM_KEY, STREAM_BITS

    a, b = engine.add(PROMPT), engine.add(PROMPT[:9])
    a.stream_key, b.stream_key = 3, 0
    first = engine.fork(a, 2) + engine.fork(b, 1)
    more = engine.fork(first[0], 1)  # a fork of a sequence counts for its prompt's key
    assert [s.seq_id for s in first + more] == [3 << STREAM_BITS, (3 << STREAM_BITS) + 1, 0,
                                                (3 << STREAM_BITS) + 2]
    b.stream_key = MAX_STREAM_KEY
    with pytest.raises(ValueError, match="prompt: stream key 262144 outside"):
        engine.fork(b, 1)


def test_unseeded_calls_never_repeat_a_seeded_call_or_a_search(model_dir):
    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=8)
    unseeded = SamplingParams(n=3, temperature=1.0, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(n=1, temperature=1.0, max_tokens=12, ignore_eos=True, seed=0)

    def draw(params):
        return [c.token_ids for c in llm.generate([PROMPT], params, use_tqdm=False)[0].outputs]

    first = draw(unseeded)
    draw(seeded)  # numbers its sequences from 0 again
    second = draw(unseeded)
    assert not {tuple(t) for t in first} & {tuple(t) for t in second}


def test_a_prefill_that_fails_frees_its_blocks(model_dir, monkeypatch):
    llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=8)
    blocks, prefill = llm.engine.pool, llm.engine.runner.prefill_prompts
    calls = []

    def failing_prefill(prompts, start=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return prefill(prompts, start)

    monkeypatch.setattr(llm.engine.runner, "prefill_prompts", failing_prefill)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([PROMPT, PROMPT[:9]], SamplingParams(max_tokens=5), use_tqdm=False)
    blocks.refresh()  # stats() reports the figures of the pool's last read
    assert llm.stats().free_blocks == blocks.num_blocks
    llm.scheduler.cache.clear()
    assert blocks.refresh() == blocks.num_blocks


def test_cuda_graphs_need_a_cuda_device(tmp_path):
    from tiny_models import build_hf_model

    build_hf_model("llama", tmp_path)
    with pytest.raises(ValueError, match="cuda_graphs"):
        Engine(load_model(tmp_path, device="cpu"), cuda_graphs=True)


def run_step_graph():
    """A DecodeGraph whose capture and replay run the step instead: the graph path's
    bookkeeping on the CPU."""
    from ttscale.engine.graphs import DecodeGraph

    class RunStep(DecodeGraph):
        def _capture(self, pool, device):
            self.reset_padding()

        def replay(self):
            return self._step()

    return RunStep


def test_graphed_decode_bookkeeping_equals_eager_steps(tmp_path):
    """The CUDA-graph path's own work, on the CPU: static buffers padded to a bucket, inputs
    advanced inside the step (positions, lengths, offsets, the next slot from the suffix
    table), outputs copied per step. Capture and replay are replaced by running the step, so
    any difference from the eager path is the bookkeeping's."""
    from tiny_models import build_hf_model

    from ttscale.engine.graphs import DecodeGraphs

    build_hf_model("llama", tmp_path)
    prompts = [[5, 9, 3, 7, 1], list(range(10, 40)), [2] * 17]
    params = SamplingParams(n=5, temperature=1.0, top_p=0.9, max_tokens=30, seed=3, logprobs=2,
                            stop=None)
    results = []
    for graphed in (True, False):
        llm = LLM(tmp_path, device="cpu", kv_budget_bytes=8 << 20, window=8, block_size=8)
        if graphed:
            graphs = DecodeGraphs(llm.model, llm.engine.kv_cache, run_step_graph())
            llm.engine.runner.graphs = graphs
        results.append(llm.generate(prompts, params, use_tqdm=False))
        if graphed:
            assert llm.engine.runner.graphs.captures > 0
    for a, b in zip(*results, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids
            assert x.cumulative_logprob == pytest.approx(y.cumulative_logprob, abs=1e-4)
            assert len(x.logprobs) == len(y.logprobs)
            for step_x, step_y in zip(x.logprobs, y.logprobs, strict=True):
                assert [i for i, _ in step_x] == [i for i, _ in step_y]
                assert [v for _, v in step_x] == pytest.approx([v for _, v in step_y], abs=1e-4)


def test_max_decode_seqs_caps_a_step_and_changes_no_sample(tmp_path):
    from tiny_models import build_hf_model

    build_hf_model("llama", tmp_path)
    params = SamplingParams(n=5, temperature=1.0, max_tokens=12, seed=7)
    prompts = [[3, 4, 5], [9, 8, 7, 6]]
    runs = {}
    for cap in (None, 2):
        llm = LLM(tmp_path, device="cpu", kv_budget_bytes=8 << 20, max_decode_seqs=cap)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runs[cap] = [[c.token_ids for c in o.outputs] for o in outputs]
        assert llm.engine.peak_sequences == (10 if cap is None else 2)
    assert runs[2] == runs[None]
    with pytest.raises(ValueError, match="max_decode_seqs"):
        LLM(tmp_path, device="cpu", kv_budget_bytes=8 << 20, max_decode_seqs=0)


def test_a_cached_graph_reused_for_fewer_rows_keeps_its_padding_inert(tmp_path):
    """A graph reused by a later call with fewer sequences in the same bucket: the rows it no
    longer uses must not keep the earlier call's positions, which can end past the rotary
    table (prompt + max_tokens - 1 = max_positions is allowed)."""
    from tiny_models import build_hf_model

    from ttscale.engine.graphs import DecodeGraphs

    build_hf_model("llama", tmp_path)
    prompt = [7] * 500  # max_positions is 512 here
    outputs = {}
    for graphed in (True, False):
        llm = LLM(tmp_path, device="cpu", kv_budget_bytes=32 << 20, window=8, block_size=8)
        assert llm.model.max_positions == 512
        if graphed:
            graphs = DecodeGraphs(llm.model, llm.engine.kv_cache, run_step_graph())
            llm.engine.runner.graphs = graphs
        for n in (6, 5):
            params = SamplingParams(n=n, temperature=1.0, max_tokens=13, seed=1, ignore_eos=True)
            outputs[graphed, n] = [c.token_ids for c in
                                   llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    assert outputs[True, 5] == outputs[False, 5]
    assert outputs[True, 6] == outputs[False, 6]


@pytest.mark.parametrize("bad", [0, 2.5, "4", True])
def test_max_decode_seqs_must_be_a_positive_int(tmp_path, bad):
    from tiny_models import build_hf_model

    build_hf_model("llama", tmp_path)
    with pytest.raises(ValueError, match="max_decode_seqs"):
        Engine(load_model(tmp_path, device="cpu"), kv_budget_bytes=8 << 20, max_decode_seqs=bad)


def test_graphs_are_refused_where_a_step_cannot_be_captured(monkeypatch):
    from ttscale import _checks
    from ttscale.engine.settings import graphs_possible as _graphs_possible

    ok, why = _graphs_possible(torch.device("cpu"), None)
    assert not ok and why == "the model is on cpu, not a CUDA device"
    ok, why = _graphs_possible(torch.device("cuda"), "torch")
    assert not ok and "torch backend" in why
    monkeypatch.setattr(_checks, "DEBUG", True)
    ok, why = _graphs_possible(torch.device("cuda"), None)
    assert not ok and "TTSCALE_DEBUG" in why


def test_a_leased_pool_keeps_back_its_decode_steps_activations(tmp_path, monkeypatch):
    from tiny_models import build_hf_model

    from ttscale.engine import memory
    from ttscale.engine.settings import decode_row_bytes
    from ttscale.model import block_bytes

    build_hf_model("llama", tmp_path)
    model = load_model(tmp_path, device="cpu")
    row = decode_row_bytes(model.config, model.dtype)
    block = block_bytes(model.config, 16, model.dtype)
    monkeypatch.setattr(memory, "_BUDGETS", {})
    monkeypatch.setattr(memory, "free_memory", lambda device: 10_000 * row)
    whole = memory.DEFAULT_FRACTION * 10_000 * row
    kept_back = {}
    for seqs in (None, 100, 1_000_000):
        engine = Engine(model, memory_share=0.5, max_decode_seqs=seqs)
        kept_back[seqs] = whole * 0.5 - engine.kv_cache.num_blocks * block
        assert engine.max_decode_seqs == (None if seqs is None else min(seqs, 2250))
        engine.memory_lease.release()
    assert 0 <= kept_back[None] < block  # on the CPU no step is capped unless asked
    assert 100 * row <= kept_back[100] < 100 * row + block
    assert 2250 * row <= kept_back[1_000_000] < 2250 * row + block  # at most half the lease


def test_max_new_tokens_per_sequence(engine):
    """Each sequence decodes its own count in one call, and draws what it draws alone."""
    seqs = engine.fork(engine.add(PROMPT), 3)
    engine.decode(seqs, GREEDY, max_new_tokens=[2, 9, 5])
    assert [s.generated for s in seqs] == [2, 9, 5]
    alone = engine.fork(engine.add(PROMPT), 1)
    engine.decode(alone, GREEDY, max_new_tokens=9)
    assert seqs[1].output_ids == alone[0].output_ids
    engine.decode(engine.fork(engine.add(PROMPT), 1), GREEDY, max_new_tokens=np.int64(2))
    for bad, message in (([1, 2], "one per sequence"), ([1, 0, 3], "at 1"), (2.0, "int >= 1")):
        with pytest.raises(ValueError, match="max_new_tokens.*" + message):
            engine.decode(engine.fork(engine.add(PROMPT), 3), GREEDY, max_new_tokens=bad)


def test_a_dropped_llm_gives_its_pool_back_without_the_garbage_collector(model_dir):
    """The scheduler holds the engine and the engine holds its scheduler only weakly, so a
    dropped LLM (and its KV pool) goes at once, not at the collector's next full pass."""
    import gc
    import weakref

    llm = LLM(str(model_dir))
    llm.generate([PROMPT], SamplingParams(n=2, max_tokens=4), use_tqdm=False)
    assert llm.engine.scheduler is llm.scheduler
    engine, pool = weakref.ref(llm.engine), weakref.ref(llm.engine.kv_cache)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del llm
        assert engine() is None and pool() is None
    finally:
        if enabled:
            gc.enable()
