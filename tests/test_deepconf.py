"""DeepConf (Fu et al. 2025): the confidence measures against a numpy reference, the online stop
on the device against the host reference at the exact token, mixed batches, seeds, the pool, the
strategy's votes, its surfaces, and the toy task with loose bounds."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import ttscale
from tiny_policy import save_tiny_policy
from ttscale import run_command
from ttscale.engine.confidence import (
    CONFIDENCE_STOP,
    TOKEN_STOP,
    ConfidenceStop,
    WindowConfidence,
    token_confidence,
    trace_scores,
)
from ttscale.engine.sequence import Prompt, Sequence
from ttscale.search import registry
from ttscale.search.select import group_answers

PROBLEMS = ["Q: 1+2\n", "Q: (3*4)-5\n", "Q: 7+8\n"]


def last_digit(text: str) -> str | None:
    return next((c for c in reversed(text) if c.isdigit()), None)


def same(a: str, b: str) -> bool:
    return a == b


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="module")
def llm(directory):
    return ttscale.LLM(directory, kv_budget_bytes=8 << 20, block_size=8)


@pytest.fixture(scope="module")
def plain(directory):
    """An engine without a scheduler: Engine.decode runs its own windows (Engine.step)."""
    from types import SimpleNamespace

    from ttscale.engine.engine import Engine
    from ttscale.model import load_model, load_tokenizer

    engine = Engine(load_model(directory), load_tokenizer(directory), kv_budget_bytes=8 << 20,
                    block_size=8)
    return SimpleNamespace(engine=engine)


def search(llm, n=4, **options):
    kwargs = dict(step_delimiter="\n", extract=last_digit, equal=same, progress=False, seed=0,
                  sampling=ttscale.SamplingParams(temperature=1.0, max_tokens=40))
    return ttscale.deepconf(llm, PROBLEMS, n, **{**kwargs, **options})


# ----------------------------------------------------------------------------------------------
# The measures, against numpy


def reference_scores(top: np.ndarray, k: int, window: int, tail: int) -> dict[str, float]:
    """``top`` float64 [T, K] log-probabilities, largest first."""
    confidence = -top[:, :k].mean(axis=1)
    if len(confidence) < window:
        groups = np.array([confidence.mean()])
    else:
        sums = np.convolve(confidence, np.ones(window), mode="valid")  # every full window
        groups = sums / window
    bottom = np.sort(groups)[: max(1, int(np.ceil(0.1 * len(groups))))]
    return {"lowest": groups.min(), "bottom10": bottom.mean(), "tail": confidence[-tail:].mean(),
            "mean": confidence.mean()}


@pytest.mark.parametrize("length, window, tail",
                         [(45, 16, 16), (200, 7, 30), (5, 16, 3), (16, 16, 64)])
def test_trace_scores_match_a_numpy_reference(length, window, tail):
    rng = np.random.default_rng(zlib.crc32(b"scores") + length)
    # log-probabilities, largest first
    top = -np.sort(rng.exponential(2.0, size=(length, 20)), axis=1)
    k = 7
    values = [token_confidence(row.tolist(), k) for row in top]
    got = trace_scores(values, window, tail)
    want = reference_scores(top, k, window, tail)
    for name in ("lowest", "bottom10", "tail", "mean"):
        assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-12), name


def reference_stop(confidence: list[float], window: int, threshold: float) -> int | None:
    """The index of the first token whose full window's mean is below ``threshold``."""
    for t in range(window, len(confidence) + 1):
        if sum(confidence[t - window : t]) / window < threshold:
            return t - 1
    return None


def test_device_state_stops_where_the_reference_does_across_windows():
    """Several rows, fed step by step over several decode windows, each gathered and scattered
    back: the first confidence flag of each row is where the reference's window mean crosses."""
    rng = np.random.default_rng(zlib.crc32(b"device-state"))
    rows, steps, window, k = 6, 60, 8, 5
    top = -np.sort(rng.exponential(1.0, size=(rows, steps, 10)), axis=2).astype(np.float32)
    confidence = [[token_confidence(top[b, t].astype(np.float64).tolist(), k) for t in range(steps)]
                  for b in range(rows)]
    prompt = Prompt(0, [1])
    seqs = [Sequence(b, prompt, [1]) for b in range(rows)]
    control = ConfidenceStop(window, k)
    thresholds = []
    for b, seq in enumerate(seqs[:-1]):  # the last row is not watched
        means = [sum(confidence[b][t - window : t]) / window for t in range(window, steps + 1)]
        thresholds.append(float(np.quantile(means, 0.2 + 0.1 * b)))
        control.watch([seq], thresholds[-1])
    stopped_at = [None] * rows
    t = 0
    for length in (3, 7, 1, 11, 20, 18):  # decode windows of different lengths
        state = WindowConfidence.begin(seqs, [control] * rows, "cpu", 10)
        for _ in range(length):
            flags = state.step(torch.from_numpy(top[:, t]), torch.zeros(rows, dtype=torch.bool))
            for b in range(rows):
                if flags[b] & CONFIDENCE_STOP and stopped_at[b] is None:
                    stopped_at[b] = t
            t += 1
        state.end()
    assert t == steps
    want = [reference_stop(confidence[b], window, thresholds[b]) for b in range(rows - 1)] + [None]
    assert stopped_at == want
    assert sum(s is not None for s in stopped_at) >= 4


def test_a_row_flagged_in_a_window_takes_no_more_updates():
    prompt = Prompt(0, [1])
    seq = Sequence(0, prompt, [1])
    control = ConfidenceStop(4, 1)
    control.watch([seq], -1e9)
    state = WindowConfidence.begin([seq], [control], "cpu", 1)
    for t in range(5):
        flags = state.step(torch.tensor([[-1.0]]), torch.tensor([t == 1]))
        assert int(flags[0]) == (TOKEN_STOP if t == 1 else 0)
    state.end()
    assert int(control.count[0]) == 2  # the stopping token counts, the discarded ones do not


# ----------------------------------------------------------------------------------------------
# The engine: the stop on the device, exactly at the reference's token


def confidences_of(seq: Sequence, k: int) -> list[float]:
    return [token_confidence([v for _, v in top], k) for top in seq.top_logprobs]


def window_means(values: list[float], window: int) -> list[float]:
    return [sum(values[t - window : t]) / window for t in range(window, len(values) + 1)]


def probe_threshold(llm, sampling, window, k) -> float:  # llm: anything with .engine
    """A threshold that most of the tiny model's traces cross somewhere in the middle."""
    engine = llm.engine
    prompt = engine.add(engine.tokenizer.encode("Q: 1+2\n"))
    seqs = engine.fork(prompt, 4)
    engine.decode(seqs, sampling)
    means = [m for s in seqs for m in window_means(confidences_of(s, k), window)]
    engine.free(seqs)
    engine.free_prompt(prompt)
    return float(np.quantile(means, 0.15))


def check_stops(seqs, window, k, threshold):
    stopped = 0
    for seq in seqs:
        values = confidences_of(seq, k)
        want = reference_stop(values, window, threshold)
        if seq.finish_reason == "confidence":
            stopped += 1
            assert want == len(values) - 1, (want, len(values))  # the stopping token is kept
            assert all(abs(m - threshold) > 1e-9 for m in window_means(values, window))
        else:
            assert seq.finish_reason == "length" and want is None
    return stopped


@pytest.mark.parametrize("owner", ["llm", "plain"])
def test_the_device_stop_fires_at_the_reference_token(owner, request):
    llm = request.getfixturevalue(owner)  # through the scheduler, or an engine's own windows
    engine = llm.engine
    assert (engine.scheduler is None) == (owner == "plain")
    window, k = 6, 5
    sampling = ttscale.SamplingParams(temperature=1.0, max_tokens=48, logprobs=k, ignore_eos=True,
                                      seed=3)
    threshold = probe_threshold(llm, sampling, window, k)
    free = engine.pool.refresh()
    prompt = engine.add(engine.tokenizer.encode("Q: (3*4)-5\n"))
    seqs = engine.fork(prompt, 8)
    control = ConfidenceStop(window, k)
    control.watch(seqs, threshold)
    reads = engine.pool.host_reads
    engine.decode(seqs, sampling, confidence_stop=control)
    windows = engine.pool.host_reads - reads
    assert windows <= math.ceil(48 / engine.window) + 1  # one read per window, not per token
    assert check_stops(seqs, window, k, threshold) >= 3
    assert any(window < s.generated < 40 for s in seqs if s.finish_reason == "confidence")
    engine.free(seqs)
    engine.free_prompt(prompt)
    assert engine.pool.refresh() == free


def test_unwatched_rows_and_requests_beside_the_stop_are_unchanged(llm):
    """A mixed batch: watched rows, unwatched rows of the same decode, and a request of the step
    API sharing its steps; the request samples what it samples alone."""
    engine = llm.engine
    window, k = 6, 5
    sampling = ttscale.SamplingParams(temperature=1.0, max_tokens=40, logprobs=k, ignore_eos=True,
                                      seed=5)
    threshold = probe_threshold(llm, sampling, window, k)
    request = ttscale.SamplingParams(temperature=1.0, max_tokens=30, seed=11, ignore_eos=True)
    alone = llm.generate(["Q: 7+8\n"], request, use_tqdm=False)[0].outputs[0].token_ids
    prompt = engine.add(engine.tokenizer.encode("Q: 1+2\n"))
    seqs = engine.fork(prompt, 6)
    control = ConfidenceStop(window, k)
    control.watch(seqs[:3], threshold)
    llm.add_request("Q: 7+8\n", request, request_id="beside")
    engine.decode(seqs, sampling, confidence_stop=control)
    outputs = {}
    while llm.has_unfinished_requests() or "beside" not in outputs:
        outputs.update((o.request_id, o) for o in llm.step())
    assert check_stops(seqs[:3], window, k, threshold) >= 1
    assert all(s.finish_reason == "length" and s.generated == 40 for s in seqs[3:])
    engine.free(seqs)
    engine.free_prompt(prompt)
    beside = outputs["beside"]
    assert beside.finished and list(beside.outputs[0].token_ids) == list(alone)


def test_the_stop_needs_the_logprobs_it_reads(llm):
    engine = llm.engine
    prompt = engine.add(engine.tokenizer.encode("Q: 1+2\n"))
    seqs = engine.fork(prompt, 1)
    with pytest.raises(ttscale.InvalidArgument, match="logprobs"):
        engine.decode(seqs, ttscale.SamplingParams(logprobs=2),
                      confidence_stop=ConfidenceStop(4, 5))
    engine.free(seqs)
    engine.free_prompt(prompt)


# ----------------------------------------------------------------------------------------------
# The strategy


def reference_vote(result, keep: int):
    """The most confident ``keep`` candidates, then the answer of highest summed confidence."""
    confidence = result.extra["confidence"]
    order = sorted(range(len(confidence)), key=lambda i: (-confidence[i], i))[:keep]
    return weighted_answer(result, sorted(order))


def weighted_answer(result, kept: list[int]):
    confidence = result.extra["confidence"]
    answered = [i for i in kept if result.candidates[i].answer is not None]
    if not answered:
        return kept, None
    groups = group_answers([result.candidates[i].answer for i in answered], same)
    totals = {}
    for i, g in zip(answered, groups):
        totals[g] = totals.get(g, 0.0) + confidence[i]
    best = max(totals, key=lambda g: (totals[g], -groups.index(g)))
    return kept, next(result.candidates[i].answer for i, g in zip(answered, groups) if g == best)


@pytest.mark.parametrize("keep_fraction, score",
                         [(0.5, "lowest"), (1.0, "bottom10"), (0.25, "tail")])
def test_offline_keeps_the_most_confident_and_votes_by_confidence(llm, keep_fraction, score):
    free = llm.engine.pool.refresh()
    results = search(llm, n=8, keep_fraction=keep_fraction, confidence_score=score,
                     confidence_window=4, confidence_tail=8)
    assert llm.engine.pool.refresh() == free
    for r in results:
        assert len(r.candidates) == 8 and r.extra["stopped"] == 0 and r.extra["threshold"] is None
        kept, answer = reference_vote(r, math.ceil(keep_fraction * 8))
        assert r.extra["kept"] == kept
        assert r.answer == answer
        assert r.chosen is None or r.chosen in kept
        assert [c.score for c in r.candidates] == r.extra["confidence"]
        assert all(value > 0 for value in r.extra["confidence"])
        assert r.cost.generated_tokens == sum(len(c.token_ids) for c in r.candidates)


def test_offline_votes_over_the_samples_best_of_n_draws(llm):
    """The same seed gives the same traces: DeepConf offline filters and weighs best-of-N's."""
    kwargs = dict(step_delimiter="\n", extract=last_digit, equal=same, progress=False, seed=0,
                  sampling=ttscale.SamplingParams(temperature=1.0, max_tokens=40))
    pool = ttscale.best_of_n(llm, PROBLEMS, 6, **kwargs)
    offline = ttscale.deepconf(llm, PROBLEMS, 6, confidence_window=4, **kwargs)
    for a, b in zip(pool, offline, strict=True):
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
        assert a.cost.generated_tokens == b.cost.generated_tokens


def test_online_stops_traces_below_the_warmup_threshold(llm):
    free = llm.engine.pool.refresh()
    results = search(llm, n=12, n_init=4, keep_fraction=0.5, consensus=1.0, confidence_window=4)
    assert llm.engine.pool.refresh() == free
    stopped = 0
    for r in results:
        assert 4 <= len(r.candidates) <= 12 and r.extra["threshold"] is not None
        assert r.extra["kept"][:4] == [0, 1, 2, 3]  # every warm-up trace votes
        for i, c in enumerate(r.candidates[4:], start=4):
            if not c.finished:
                assert i not in r.extra["kept"]
            else:
                assert i in r.extra["kept"]
        assert r.answer == weighted_answer(r, r.extra["kept"])[1]
        stopped += r.extra["stopped"]
        assert r.extra["stopped"] == sum(not c.finished for c in r.candidates[4:])
    assert stopped >= 1


def test_online_stops_sampling_at_consensus(llm):
    results = search(llm, n=12, n_init=4, keep_fraction=0.9, consensus=0.01, confidence_window=4)
    assert all(len(r.candidates) == 4 for r in results)  # any vote reaches 1% at once


def test_same_seed_same_result_and_another_seed_differs(llm):
    def summary(results):
        return [(r.answer, [c.text for c in r.candidates], r.extra) for r in results]

    options = dict(n=8, n_init=4, keep_fraction=0.5, consensus=1.0, confidence_window=4)
    first = summary(search(llm, **options))
    assert summary(search(llm, **options)) == first
    assert summary(search(llm, seed=1, **options)) != first


def test_a_verifier_weights_the_vote(llm):
    from test_strategies import prefers

    verifier = prefers("1")
    results = search(llm, n=4, verifier=verifier, keep_fraction=1.0, select="best",
                     confidence_window=4)
    for r in results:
        if r.chosen is not None:
            scores = [r.candidates[i].score for i in r.extra["kept"] if r.candidates[i].answer]
            assert r.candidates[r.chosen].score == max(scores)
    assert not verifier.live


# ----------------------------------------------------------------------------------------------
# Surfaces


def test_declared_once_and_reachable_from_the_cli_and_the_server():
    spec = registry.get("deepconf")
    assert ttscale.deepconf is spec.function and not spec.needs_verifier and not spec.menu
    assert "Fu et al. (2025)" in ttscale.deepconf.__doc__
    flags = run_command.flag_options()
    for name in ("confidence_window", "confidence_top_k", "confidence_score", "keep_fraction",
                 "n_init", "consensus", "confidence_tail"):
        assert "deepconf" in flags[name][1]
    assert {f.name for f in spec.flag_fields()} >= {"confidence_score", "n_init"}
    assert spec.options().confidence_window == 2048  # the paper's window
    assert spec.options.for_budget(16)["confidence_window"] == 16  # the toy task's
    assert set(spec.options.variants(16)) == {"-offline", "-online"}


def test_cli_refuses_a_bad_deepconf_flag_naming_it(tmp_path, capsys):
    from ttscale import cli
    from ttscale.toy import policy_dir

    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    model = ["run", "--model", str(policy_dir()), "--data", str(data)]
    base = model + ["--out", str(tmp_path / "o.jsonl"), "--strategy", "deepconf", "--n", "4"]

    def refused(argv) -> str:
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2
        return capsys.readouterr().err

    assert "argument --confidence-score: expected one of" in refused(
        base + ["--confidence-score", "median"])
    assert "argument --n-init" in refused(base + ["--n-init", "5"])
    other = model + ["--out", str(tmp_path / "p.jsonl"), "--strategy", "best_of_n", "--n", "4",
                     "--confidence-window", "8"]
    assert "not an option of best_of_n" in refused(other)


def test_the_toy_task_votes_at_least_about_as_well_as_majority():
    """40 held-out toy problems at N=8: DeepConf offline within a loose bound of majority vote,
    online within a loose bound of offline, with fewer tokens."""
    from ttscale.toy import policy_dir, task

    torch.set_num_threads(1)
    problems = task.problems("heldout", 40, seed=0)
    texts = [f"Q: {p.text}" for p in problems]
    refs = [str(p.answer) for p in problems]
    llm = ttscale.LLM(policy_dir(), seed=0, kv_budget_bytes=64 << 20)
    common = dict(step_delimiter="\n", prompt_fn=lambda p: p + "\n", progress=False, seed=0,
                  sampling=ttscale.SamplingParams(temperature=1.0, max_tokens=96))
    majority = ttscale.best_of_n(llm, texts, 8, **common)
    offline = ttscale.deepconf(llm, texts, 8, keep_fraction=0.5, confidence_window=16,
                               confidence_tail=16, **common)

    def accuracy(results):
        return sum(r.answer is not None and r.answer.strip() == ref
                   for r, ref in zip(results, refs)) / len(refs)

    online = ttscale.deepconf(llm, texts, 8, keep_fraction=0.5, n_init=2, confidence_window=16,
                              confidence_tail=16, **common)

    def tokens(results):
        return sum(r.cost.generated_tokens for r in results)

    assert accuracy(offline) >= accuracy(majority) - 0.1
    assert accuracy(offline) >= 0.2
    assert accuracy(online) >= accuracy(offline) - 0.15
    assert tokens(online) < tokens(offline) == tokens(majority)
    assert sum(r.extra["stopped"] for r in online) > 0
