"""The step API (``add_request``/``step``/``abort``/``stats``) and the scheduler under it: requests
join at any step, the pool is shared optimistically with preemption, and a seeded request's
samples do not depend on what runs beside it."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import build_tiny_llama

from ttscale.errors import InvalidArgument, TTScaleError, UnknownRequest
from ttscale.llm import LLM, RequestOutput
from ttscale.sampling_params import SamplingParams
from ttscale.toy.tokenizer import build_tokenizer

VOCAB = build_tokenizer().get_vocab_size()
EOS = build_tokenizer().token_to_id("</s>")
PROMPT = [1, 22, 23, 20, 18, 7, 14, 8, 19, 16, 6, 21, 7, 14, 8, 17, 11, 20, 3]
OTHER = [1, 9, 4, 12, 5, 30, 2]
BLOCK = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def make_llm(model_dir, blocks: int | None = None) -> LLM:
    """An LLM whose pool holds ``blocks`` KV blocks (default: plenty)."""
    if blocks is None:
        return LLM(model_dir, kv_budget_bytes=4 << 20, block_size=BLOCK)
    probe = LLM(model_dir, kv_budget_bytes=1 << 20, block_size=BLOCK)
    per_block = (1 << 20) // probe.engine.pool.num_blocks
    llm = LLM(model_dir, kv_budget_bytes=blocks * per_block, block_size=BLOCK)
    assert llm.engine.pool.num_blocks == blocks
    return llm


def tokens(outputs: list[RequestOutput]) -> list[list[list[int]]]:
    return [[c.token_ids for c in out.outputs] for out in outputs]


def run_all(llm: LLM) -> dict[str, RequestOutput]:
    """Step until every request finished; the last output of each."""
    last = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            last[out.request_id] = out
    return last


SAMPLED = SamplingParams(n=4, temperature=1.0, max_tokens=12, ignore_eos=True, seed=7)


def test_add_request_and_step_return_cumulative_outputs_of_all_n(model_dir):
    llm = make_llm(model_dir)
    rid = llm.add_request(PROMPT, SAMPLED)
    assert isinstance(rid, str)
    seen = []
    while llm.has_unfinished_requests():
        (out,) = llm.step()
        assert out.request_id == rid and out.prompt_token_ids == PROMPT
        assert [c.index for c in out.outputs] == [0, 1, 2, 3]
        seen.append([len(c.token_ids) for c in out.outputs])
    assert seen[-1] == [12] * 4 and seen == sorted(seen)  # tokens so far, growing
    assert out.finished and all(c.finish_reason == "length" for c in out.outputs)
    assert llm.step() == []


def test_text_prompts_and_request_ids(model_dir):
    llm = make_llm(model_dir)
    assert llm.add_request("7+8=", SamplingParams(max_tokens=3), request_id="mine") == "mine"
    first, second = llm.add_request(OTHER), llm.add_request(OTHER)
    assert first != second and "mine" not in (first, second)
    outs = run_all(llm)
    assert set(outs) == {"mine", first, second} and outs["mine"].prompt == "7+8="


def test_generate_is_the_step_loop(model_dir):
    """generate's results equal the same requests driven through add_request/step."""
    llm = make_llm(model_dir)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_tokens=10, seed=3, logprobs=2)
    by_generate = llm.generate([PROMPT, OTHER], params, use_tqdm=False)
    assert all(out.finished for out in by_generate)
    single = [llm.generate([p], params, use_tqdm=False)[0] for p in (PROMPT, OTHER)]
    # a seeded request's samples depend on its seed and its position in the call
    assert tokens(by_generate)[0] == tokens(single)[0]
    rid = llm.add_request(PROMPT, params)
    assert tokens([run_all(llm)[rid]]) == tokens(by_generate[:1])
    assert len(by_generate[0].outputs[0].logprobs[0]) == 2


def test_a_seeded_request_samples_the_same_alone_or_beside_others(model_dir):
    alone = make_llm(model_dir)
    rid = alone.add_request(PROMPT, SAMPLED)
    expected = tokens([run_all(alone)[rid]])

    crowded = make_llm(model_dir)
    crowded.add_request(OTHER, SamplingParams(n=5, temperature=0.7, max_tokens=20, ignore_eos=True))
    crowded.add_request(PROMPT, SamplingParams(n=2, temperature=0.0, max_tokens=5))
    crowded.step()
    crowded.step()  # it joins two steps late, beside different settings
    rid = crowded.add_request(PROMPT, SAMPLED)
    crowded.add_request(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=30, ignore_eos=True))
    assert tokens([run_all(crowded)[rid]]) == expected


def test_greedy_and_sampled_requests_share_a_step(model_dir):
    llm = make_llm(model_dir)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    (alone,) = llm.generate([PROMPT], greedy, use_tqdm=False)
    a = llm.add_request(PROMPT, greedy)
    llm.add_request(PROMPT, SamplingParams(n=6, temperature=1.5, top_k=5, max_tokens=16))
    steps_before = llm.stats().steps
    outs = run_all(llm)
    assert outs[a].outputs[0].token_ids == alone.outputs[0].token_ids
    assert llm.stats().steps - steps_before == 16  # one window a token: they ran side by side


def test_many_samples_through_a_small_pool_equal_a_big_pool(model_dir):
    """n=256 through a pool that holds about 20 sequences: the scheduler admits them piecewise
    and preempts, and the results are those of a pool that holds them all."""
    params = SamplingParams(n=256, temperature=1.0, max_tokens=24, ignore_eos=True, seed=11)
    (big,) = make_llm(model_dir).generate([PROMPT], params, use_tqdm=False)
    small = make_llm(model_dir, blocks=3 + 20 * 4)  # the prompt, and 20 sequences of 25 tokens
    (out,) = small.generate([PROMPT], params, use_tqdm=False)
    assert small.engine.peak_sequences < 128  # never all at once
    assert tokens([out]) == tokens([big])
    assert small.stats().free_blocks == small.stats().total_blocks  # nothing leaked


def test_growth_preempts_the_newest_work_and_everything_finishes(model_dir):
    llm = make_llm(model_dir, blocks=16)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=40, ignore_eos=True, seed=5)
    (expected,) = make_llm(model_dir).generate([OTHER], params, use_tqdm=False)
    ids = [llm.add_request(OTHER, params) for _ in range(3)]
    preempted = 0
    last = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            last[out.request_id] = out
        preempted = max(preempted, llm.stats().preempted)
    assert preempted > 0  # 6 sequences of 47 tokens need 36 blocks: some had to wait
    for rid in ids:  # same seed, same prompt: the same samples, preempted or not
        assert tokens([last[rid]]) == tokens([expected])
    assert llm.stats().free_blocks == 16


def test_abort_frees_the_blocks_at_once(model_dir):
    llm = make_llm(model_dir)
    total = llm.stats().total_blocks
    keep = llm.add_request(OTHER, SamplingParams(n=2, max_tokens=20, ignore_eos=True))
    gone = llm.add_request(PROMPT, SamplingParams(n=8, max_tokens=50, ignore_eos=True))
    llm.step()
    held = total - llm.stats().free_blocks
    llm.abort(gone)
    assert total - llm.stats().free_blocks < held
    assert llm.stats().running == 1
    outs = run_all(llm)
    assert set(outs) == {keep} and outs[keep].finished
    assert llm.stats().free_blocks == total


@pytest.mark.parametrize("request_id", ["nope", "0"])
def test_unknown_request_id_is_a_key_error_naming_it(model_dir, request_id):
    llm = make_llm(model_dir)
    with pytest.raises(KeyError, match=f"request_id: no request '{request_id}'") as caught:
        llm.abort(request_id)
    assert isinstance(caught.value, UnknownRequest) and isinstance(caught.value, InvalidArgument)
    assert caught.value.param == "request_id"


@pytest.mark.parametrize(
    "call, param",
    [
        (lambda llm: llm.add_request(PROMPT, request_id="dup"), "request_id"),
        (lambda llm: llm.add_request(PROMPT, request_id=5), "request_id"),
        (lambda llm: llm.add_request(PROMPT, params="greedy"), "params"),
        (lambda llm: llm.add_request([], SamplingParams()), "prompt"),
        (lambda llm: llm.add_request([VOCAB + 3], SamplingParams()), "prompt"),
        (lambda llm: llm.add_request(PROMPT, SamplingParams(max_tokens=600)), "max_tokens"),
        (lambda llm: llm.add_request(list(range(1, 40)) * 14, SamplingParams(max_tokens=2)), "prompt"),
    ],
    ids=["duplicate-id", "id-not-str", "params-type", "empty-prompt", "bad-token",
         "past-positions", "too-long"],
)
def test_bad_requests_are_refused_at_add_request_naming_the_argument(model_dir, call, param):
    llm = make_llm(model_dir)
    llm.add_request(PROMPT, SamplingParams(max_tokens=3), request_id="dup")
    with pytest.raises(TTScaleError) as caught:
        call(llm)
    assert isinstance(caught.value, InvalidArgument) and caught.value.param == param
    assert param in str(caught.value)
    assert set(run_all(llm)) == {"dup"}  # the engine keeps serving


def test_a_request_that_can_never_fit_the_pool_is_refused(model_dir):
    llm = make_llm(model_dir, blocks=4)
    with pytest.raises(InvalidArgument) as caught:
        llm.add_request(PROMPT, SamplingParams(max_tokens=40))
    assert caught.value.param == "max_tokens"


def test_stats_count_steps_and_one_host_read_a_step(model_dir):
    llm = make_llm(model_dir)
    before = llm.stats()
    assert (before.running, before.waiting, before.preempted) == (0, 0, 0)
    llm.add_request(PROMPT, SamplingParams(n=3, max_tokens=6, ignore_eos=True))
    llm.add_request(OTHER, SamplingParams(n=2, max_tokens=6, ignore_eos=True))
    assert llm.stats().waiting == 2
    llm.step()
    after = llm.stats()
    assert after.running == 2 and after.waiting == 0 and after.steps == before.steps + 1
    assert after.host_reads == before.host_reads + 1
    assert after.free_blocks < after.total_blocks and after.prefix_hit_tokens == 0
    run_all(llm)
    assert llm.stats().host_reads - after.host_reads == llm.stats().steps - after.steps


def test_a_step_reads_the_device_once_and_a_window_once_for_its_steps(model_dir):
    """Every read of the engine goes through the pool's one counted read: one a scheduler step,
    the tokens, finish flags and the pool's free count packed together; with a window of 4
    decode steps a scheduler step reads once for its 4 tokens (20 tokens: 5 reads, not 20)."""
    params = SamplingParams(n=4, temperature=1.0, max_tokens=20, ignore_eos=True, seed=3)
    last = {}
    for window in (1, 4):
        llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=BLOCK, window=window)
        llm.add_request(PROMPT, params)
        reads = []
        while llm.has_unfinished_requests():
            before = llm.stats().host_reads
            last[window] = llm.step()
            reads.append(llm.stats().host_reads - before)
        assert reads == [1] * (20 // window)
    assert tokens(last[1]) == tokens(last[4]) and len(last[4][0].outputs[0].token_ids) == 20


def test_a_beam_search_step_reads_the_device_once(model_dir):
    """A search step's selection and forks run on the pool's device; the host reads the
    children's parents and lengths once per step, with the decode's one read per step."""
    llm = make_llm(model_dir)
    engine = llm.engine
    prompt = engine.add(PROMPT)
    seqs = engine.fork(prompt, 6)
    sampling = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=1)
    for _ in range(3):
        before = engine.pool.host_reads
        engine.decode(seqs, sampling, max_new_tokens=1)
        decoded = engine.pool.host_reads - before
        seqs, parents, offsets = engine.select_and_fork(seqs, [float(i % 4) for i in range(6)],
                                                        [6], keep=3, children=2)
        assert decoded == 1 and engine.pool.host_reads - before == 2
        assert (offsets, parents) == ([0, 6], [3, 3, 2, 2, 1, 1])  # best first, ties to the lower
    engine.free(seqs)
    engine.free_prompt(prompt)
    assert engine.pool.num_free == engine.pool.num_blocks  # no row is live: known unread


def test_generate_calls_from_two_threads_share_steps(model_dir):
    llm = make_llm(model_dir)
    params = [SamplingParams(n=4, temperature=1.0, max_tokens=30, ignore_eos=True, seed=s)
              for s in (1, 2)]
    alone = [llm.generate([PROMPT], p, use_tqdm=False) for p in params]
    steps = llm.stats().steps
    results: dict[int, list] = {}
    started = threading.Barrier(2)

    def call(i):
        started.wait()
        results[i] = llm.generate([PROMPT], params[i], use_tqdm=False)

    threads = [threading.Thread(target=call, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [tokens(results[i]) for i in (0, 1)] == [tokens(a) for a in alone]
    assert llm.stats().steps - steps < 2 * 30  # shared steps, not one call after the other


def test_the_step_api_and_errors_are_exported_from_the_package_top():
    import ttscale

    for name in ("RequestOutput", "CompletionOutput", "EngineStats", "TTScaleError",
                 "InvalidArgument", "UnknownRequest", "PoolExhausted"):
        assert getattr(ttscale, name).__name__ == name
    assert issubclass(ttscale.UnknownRequest, KeyError) and issubclass(ttscale.InvalidArgument, ValueError)
    assert issubclass(ttscale.PoolExhausted, ttscale.TTScaleError)


# ---------------------------------------------------------------------------------------------
# Prefix caching across requests


def test_sixteen_n1_requests_prefill_their_prompt_once(model_dir):
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=4)
    cold = make_llm(model_dir)
    cached = make_llm(model_dir)
    uncached = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=BLOCK, prefix_caching=False)
    outs = {}
    for llm in (cached, uncached):
        ids = [llm.add_request(PROMPT, params) for _ in range(16)]  # all arrive in one step
        last = run_all(llm)
        outs[llm] = [last[i] for i in ids]
    full_blocks = (len(PROMPT) - 1) // BLOCK
    assert cached.stats().prefix_hit_tokens == 15 * full_blocks * BLOCK
    assert uncached.stats().prefix_hit_tokens == 0
    assert cached.engine.prefilled_tokens == uncached.engine.prefilled_tokens - 15 * full_blocks * BLOCK
    assert tokens(outs[cached]) == tokens(outs[uncached])  # the shared KV is the same KV
    rid = cold.add_request(PROMPT, params)
    assert tokens([run_all(cold)[rid]]) == tokens(outs[cached][:1])


def test_requests_sharing_a_system_prompt_share_its_blocks(model_dir):
    system = list(range(2, 2 + 4 * BLOCK))  # four full blocks
    questions = [[3 + i % 40, 3 + (7 * i) % 40, 3] for i in range(64)]
    params = SamplingParams(temperature=0.9, max_tokens=4, ignore_eos=True, seed=2)
    results, hits = {}, {}
    for caching in (True, False):
        llm = LLM(model_dir, kv_budget_bytes=4 << 20, block_size=BLOCK, prefix_caching=caching)
        results[caching] = llm.generate([system + q for q in questions], params, use_tqdm=False)
        hits[caching] = llm.stats().prefix_hit_tokens
    assert tokens(results[True]) == tokens(results[False])
    assert hits == {True: 63 * len(system), False: 0}  # the system prompt, prefilled once


def test_the_cache_gives_its_blocks_back_when_the_pool_runs_short(model_dir):
    llm = make_llm(model_dir, blocks=24)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=20, ignore_eos=True, seed=9)
    prompts = [[1] + [(7 * i + j) % (VOCAB - 3) + 3 for j in range(30)] for i in range(12)]
    for prompt in prompts:  # each distinct: the cache fills, then must give way
        llm.add_request(prompt, params)
    outs = run_all(llm)
    assert len(outs) == 12 and all(o.finished for o in outs.values())
    assert llm.stats().free_blocks == 24
    cache = llm.scheduler.cache
    counts = llm.engine.pool.state.ref_counts[cache.hit_blocks(list(cache.key_of)).long()]
    assert cache.key_of and counts.eq(1).all()  # the cache alone holds what it indexes
    cache.clear()
    assert llm.engine.pool.refresh() == 24


def test_prefix_cache_keeps_the_pool_invariants_over_random_use():
    import random

    from ttscale.engine.pool import Pool
    from ttscale.engine.prefix_cache import PrefixCache

    rng = random.Random(0)
    pool = Pool(40, 4)
    cache = PrefixCache(pool)
    rows: list[int] = []
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for step in range(2000):
        action = rng.random()
        if action < 0.5:
            prompt = rng.choice(prefixes)[: rng.randrange(1, 13)] + [rng.randrange(50) for _ in range(rng.randrange(6))]
            hit = cache.match(prompt)
            need = pool.blocks_for(len(prompt) - 1) - len(hit)
            cache.evict(need)
            if need > pool.num_free:
                cache.unmatch(hit)
                continue
            (row,) = pool.new_rows(1)
            pool.set_prefix(row, cache.hit_blocks(hit) if hit else torch.empty(0))
            pool.reserve(row, len(hit) * 4, len(prompt) - 1 - len(hit) * 4)
            cache.insert(prompt, row, hit)
            rows.append(row)
        elif rows:
            row = rows.pop(rng.randrange(len(rows)))
            cache.forget_row(row)
            pool.release([row])
        if step % 10 == 0:  # a read now and then, as the engine's steps make them
            free = pool.num_free
            assert pool.refresh() >= free  # the host's figure is a lower bound
        indexed = list(cache.key_of)
        if step % 50 == 0:  # the cache's own references count too
            pool.check(rows, cache.hit_blocks(indexed) if indexed else None)
        for entry in indexed:
            parent = cache.key_of[entry][0]
            assert parent == -1 or parent in cache.key_of  # a chain never loses its head
        assert cache.evictable() + pool.num_free <= pool.num_blocks
    for row in rows:
        cache.forget_row(row)
    pool.release(rows)
    assert cache.evictable() == len(cache.key_of)  # known without a read
    cache.clear()
    assert pool.refresh() == pool.num_blocks
    pool.check([])
