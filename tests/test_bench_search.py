"""The search benchmarks' own bookkeeping (bench/bench_search.py, bench/bench_beam.py), on tiny
random models: the work they replay is the work they say."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import bench_beam  # noqa: E402
import bench_search  # noqa: E402

from ttscale.engine.engine import Engine  # noqa: E402
from ttscale.sampling_params import SamplingParams  # noqa: E402

TINY = bench_beam.TINY_SHAPE  # bench/settings.py's tiny dimensions over the small Llama


def test_beam_search_of_width_one_is_greedy_decoding(tmp_path, monkeypatch):
    model = bench_search.random_model(TINY, "cpu", torch.float32, tmp_path)
    engine = Engine(model, kv_budget_bytes=64 << 20)
    prompts = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(1)).tolist()
    monkeypatch.setattr(bench_beam, "WIDTH", 1)
    beams = bench_beam.beam_search(engine, prompts, 10)
    assert engine.pool.refresh() == engine.pool.num_blocks  # it freed every beam and prompt
    seqs = [engine.fork(p, 1)[0] for p in engine.add_many(prompts)]
    engine.decode(seqs, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    assert beams == [s.output_ids for s in seqs]


def test_beam_search_keeps_the_best_continuations(tmp_path):
    """Width 4 against a brute-force beam search over the model's log-probabilities (the model's
    weights scaled up, so that its distributions are far from uniform and a wrong ranking
    shows)."""
    model = bench_search.random_model(TINY, "cpu", torch.float32, tmp_path)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(8.0)
    engine = Engine(model, kv_budget_bytes=64 << 20)
    prompts = torch.randint(3, 512, (3, 12), generator=torch.Generator().manual_seed(2)).tolist()
    ours = bench_beam.beam_search(engine, prompts, 6)

    def log_probs(tokens: list[int]) -> dict[int, float]:
        seq = engine.fork(engine.add(tokens), 1)[0]
        engine.decode([seq], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                                            logprobs=20))
        top = dict(seq.top_logprobs[-1])
        engine.free([seq])
        return top

    for prompt, best in zip(prompts, ours, strict=True):
        beams = [(0.0, [])]
        for _ in range(6):
            options = [(score + lp, out + [token]) for score, out in beams
                       for token, lp in log_probs(prompt + out).items()]
            beams = sorted(options, key=lambda x: -x[0])[: bench_beam.WIDTH]
        assert best == beams[0][1]


def test_best_of_n_replays_the_lengths_and_scores_every_new_token(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_search.MODELS, "cpu", (TINY, TINY))
    search = bench_search.Search("cpu", tmp_path)
    try:
        shapes = bench_search.subset(2)
        search.best_of_n(shapes, 4, random.Random(0))
        low = sum(round(0.75 * n) for s in shapes for n in s["steps"]) * 4
        high = sum(round(1.25 * n) + 1 for s in shapes for n in s["steps"]) * 4
        assert low <= search.generated <= high
        # The PRM prefills each candidate once: its tokens and the prompt's last one per path.
        assert search.scored == search.generated + 2 * 4
        assert search.policy.pool.refresh() == search.policy.pool.num_blocks
        assert search.prm.pool.refresh() == search.prm.pool.num_blocks
    finally:
        search.close()


def test_beam_search_scores_only_new_steps(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_search.MODELS, "cpu", (TINY, TINY))
    search = bench_search.Search("cpu", tmp_path)
    try:
        search.beam_search(bench_search.subset(2), 8, random.Random(0))
        assert search.scored == search.generated + 2 * 8  # each step once, on the shared prefix
        assert search.policy.pool.refresh() == search.policy.pool.num_blocks
        assert search.prm.pool.refresh() == search.prm.pool.num_blocks
    finally:
        search.close()
