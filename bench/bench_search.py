"""PRM search at MATH-500's shapes: best-of-N and beam search, timed on a subset of the problems
and projected to all 500 (issue 9 §3), against search-and-learn's published times on one H100
(about 3 hours for best-of-256, over 60 hours for beam search at N=256).

The models have random weights, so their text is noise; what is replayed is the work. Each
problem's prompt length and step lengths come from ``bench/math500_shapes.json`` (MATH-500's
reference solutions, see ``bench/math500_shapes.py``); a candidate's step is that length times a
seeded factor in [0.75, 1.25]. Sampling ignores EOS and stops each sequence at its step's length
(``Engine.decode(max_new_tokens=[...])``).

- best-of-N: per problem, N samples of the whole solution (the prompt prefilled once, N forks),
  then the PRM prefills each candidate after the PRM's own prompt (prefilled once per problem)
  and reads a score at every step's end.
- beam search (beam width 4, N beams): every iteration decodes one step of each live beam, the PRM
  prefills only that step on top of the beam's scored prefix, and each problem keeps its N/4 best
  and forks each 4 times (``Engine.select_and_fork`` in both engines, on the same scores); a
  problem ends after its last step.

The PRM is a policy-shaped transformer of the PRM's size run through the engine's prefill; its
reward head (one matrix-vector product per step) is left out as negligible. GPU shapes:
Qwen2.5-1.5B policy, Qwen2.5-Math-7B-PRM-sized PRM, bf16, the device's KV budget split 0.6 / 0.4.
The table prints the measured wall time of the subset, its tokens, and the projection to 500
problems by generated tokens; and the compute floor of the subset (every policy and PRM token
through 2 FLOPs per parameter of its matrix products at the peak rate).

Run: ``TTSCALE_BENCH_DEVICES=cuda pytest bench/bench_search.py --benchmark-enable -s``;
``TTSCALE_BENCH_SEARCH_PROBLEMS`` sets the subset (default 8 on a GPU, 2 on the CPU, spread over
the set). ``TTSCALE_BENCH_TINY=1``: tiny shapes, to check the code.
"""

from __future__ import annotations

import gc
import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
from settings import DEVICES, TINY, TINY_DIMS

SHAPES = json.loads((Path(__file__).parent / "math500_shapes.json").read_text())["problems"]
BEAM_WIDTH = 4
MAX_ITERATIONS = 40  # search-and-learn's default
PUBLISHED_HOURS = {"best_of_n": 3.0, "beam_search": 60.0}  # search-and-learn, one H100, N=256

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "max_position_embeddings": 4096, "hidden_act": "silu",
         "bos_token_id": 1, "eos_token_id": 2, "use_sliding_window": False}
MODELS = {  # (policy config, PRM config) per device
    "cuda": (
        {**QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
         "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
         "tie_word_embeddings": True},  # Qwen2.5-1.5B
        {**QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
         "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
         "tie_word_embeddings": False},  # Qwen2.5-Math-7B-PRM800K / -PRM's transformer
    ),
    "cpu": (
        {**QWEN2, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
         "tie_word_embeddings": True},
        {**QWEN2, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096,
         "tie_word_embeddings": False},
    ),
}
if TINY:
    tiny = {**QWEN2, **TINY_DIMS, "tie_word_embeddings": True}
    MODELS = {"cuda": (tiny, tiny), "cpu": (tiny, tiny)}
SAMPLES = {"cuda": 256, "cpu": 16}
if TINY:
    SAMPLES = {"cuda": 8, "cpu": 8}
DEFAULT_PROBLEMS = {"cuda": 8, "cpu": 2}
TABLE = "PRM search at MATH-500 shapes, projected to 500 problems ({device}, {dtype})"


def subset(count: int) -> list[dict]:
    """``count`` problems spread evenly over the set (short and long ones alike)."""
    step = len(SHAPES) / count
    return [SHAPES[int(i * step)] for i in range(count)]


def step_lengths(problem: dict, rng: random.Random, scale: float) -> list[int]:
    return [max(1, round(n * scale * rng.uniform(0.75, 1.25))) for n in problem["steps"]]


def random_model(config: dict, device: str, dtype: torch.dtype, directory: Path):
    """Our transformer with the published shape and small random weights (nothing saved)."""
    from ttscale.model import read_config
    from ttscale.model.transformer import Transformer

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    model = Transformer(read_config(directory), config["max_position_embeddings"], dtype=dtype,
                        device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # norms
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model


class Search:
    """The two engines and the work they did."""

    def __init__(self, device: str, tmp: Path):
        from ttscale.engine.engine import Engine
        from ttscale.engine.memory import pair_shares

        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.dtype = dtype
        policy_cfg, prm_cfg = MODELS[device]
        self.policy_model = random_model(policy_cfg, device, dtype, tmp / "policy")
        self.prm_model = random_model(prm_cfg, device, dtype, tmp / "prm")
        shares = pair_shares(device)
        budgets = {} if shares[0] is not None else {"kv_budget_bytes": 1 << 30}
        self.policy = Engine(self.policy_model, memory_share=shares[0], **budgets)
        self.prm = Engine(self.prm_model, memory_share=shares[1], cuda_graphs=False,
                          max_decode_seqs=1, **budgets)
        self.vocab = min(policy_cfg["vocab_size"], prm_cfg["vocab_size"])
        self.head = torch.randn(prm_cfg["hidden_size"], device=device, dtype=dtype)
        self.generated = self.scored = 0

    def close(self) -> None:
        """Give the device back: the engines' leases and the allocator's cached blocks, so that
        the next row measures its budget from the memory actually free."""
        for engine in (self.policy, self.prm):
            if engine.memory_lease is not None:
                engine.memory_lease.release()
        self.policy = self.prm = self.policy_model = self.prm_model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def sampling(self, most: int):
        from ttscale.sampling_params import SamplingParams

        return SamplingParams(temperature=0.8, top_p=1.0, max_tokens=most, ignore_eos=True, seed=0)

    def prompts(self, shapes: list[dict], rng: random.Random) -> list[list[int]]:
        return [[rng.randrange(3, self.vocab) for _ in range(s["prompt"])] for s in shapes]

    def score(self, seqs, ends: list[list[int]]) -> list[float]:
        """Run the PRM sequences' pending tokens; the score of each at its last step end."""
        hidden = self.prm.run_pending(seqs, hidden_at={s: e for s, e in zip(seqs, ends)})
        rows = torch.stack([hidden[s][-1] for s in seqs])
        return (rows @ self.head).float().tolist()

    def best_of_n(self, shapes: list[dict], n: int, rng: random.Random) -> None:
        for shape, prompt in zip(shapes, self.prompts(shapes, rng), strict=True):
            lengths = [step_lengths(shape, rng, 1.0) for _ in range(n)]
            totals = [sum(steps) for steps in lengths]
            seqs = self.policy.fork(self.policy.add(prompt), n)
            self.policy.decode(seqs, self.sampling(max(totals)), max_new_tokens=totals)
            self.generated += sum(s.generated for s in seqs)
            paths = self.prm.fork(self.prm.add(prompt), n)
            ends = []
            for path, seq, steps in zip(paths, seqs, lengths, strict=True):
                self.prm.extend(path, seq.output_ids)
                first = len(path.tokens) - len(seq.output_ids)
                cuts, at = [], first - 1
                for k in steps:
                    at += k
                    cuts.append(at)
                ends.append(cuts)
            before = self.prm.prefilled_tokens
            self.score(paths, ends)
            self.scored += self.prm.prefilled_tokens - before
            self.policy.free(seqs)
            self.prm.free(paths)
            self.policy.free_prompt(seqs[0].prompt)
            self.prm.free_prompt(paths[0].prompt)

    def beam_search(self, shapes: list[dict], n: int, rng: random.Random) -> None:
        keep = n // BEAM_WIDTH
        prompts = self.prompts(shapes, rng)
        # Live problems: [shape, policy beams, PRM beams, per-beam step lengths].
        live = []
        for shape, prompt in zip(shapes, prompts, strict=True):
            beams = self.policy.fork(self.policy.add(prompt), n)
            paths = self.prm.fork(self.prm.add(prompt), n)
            live.append([shape, beams, paths])
        for iteration in range(MAX_ITERATIONS):
            if not live:
                return
            beams = [b for _, bs, _ in live for b in bs]
            paths = [p for _, _, ps in live for p in ps]
            lengths = [max(1, round(shape["steps"][iteration] * rng.uniform(0.75, 1.25)))
                       for shape, bs, _ in live for _ in bs]
            before = [b.generated for b in beams]
            self.policy.decode(beams, self.sampling(max(b.generated for b in beams)
                                                    + max(lengths)), max_new_tokens=lengths)
            for beam, path, old in zip(beams, paths, before, strict=True):
                self.prm.extend(path, beam.output_ids[old:])
            self.generated += sum(b.generated for b in beams) - sum(before)
            prefilled = self.prm.prefilled_tokens
            scores = self.score(paths, [[len(p.tokens) - 1] for p in paths])
            self.scored += self.prm.prefilled_tokens - prefilled
            going, ended = [], []
            for entry in live:
                (ended if iteration + 1 >= len(entry[0]["steps"]) else going).append(entry)
            for _, bs, ps in ended:
                self.policy.free(bs)
                self.prm.free(ps)
                self.policy.free_prompt(bs[0].prompt)
                self.prm.free_prompt(ps[0].prompt)
            if not going:
                return
            chosen = {id(b) for _, bs, _ in going for b in bs}
            pick = [i for i, b in enumerate(beams) if id(b) in chosen]
            sizes = [len(bs) for _, bs, _ in going]
            kids, _, _ = self.policy.select_and_fork(
                [beams[i] for i in pick], [scores[i] for i in pick], sizes, keep, BEAM_WIDTH)
            prm_kids, _, _ = self.prm.select_and_fork(
                [paths[i] for i in pick], [scores[i] for i in pick], sizes, keep, BEAM_WIDTH)
            start = 0
            for entry, size in zip(going, sizes, strict=True):
                width = min(keep, size) * BEAM_WIDTH
                entry[1], entry[2] = kids[start:start + width], prm_kids[start:start + width]
                start += width
            live = going


def matmul_params(model) -> int:
    """Parameters a token goes through as matrix products: the layers, plus the LM head where a
    token needs logits (the policy; the PRM's scores come from one vector, left out). The
    embedding table is gathered, not multiplied."""
    layers = sum(p.numel() for p in model.layers.parameters())
    return layers + (model.lm_head.numel() if model.lm_head is not None else 0)


def floor_seconds(policy_params: int, prm_params: int, generated: int, scored: int,
                  peak: float | None) -> float | None:
    if peak is None:
        return None
    return 2 * (generated * policy_params + scored * prm_params) / peak


def expected_tokens(shapes: list[dict], n: int) -> int:
    return n * sum(sum(s["steps"]) for s in shapes)


PARAMS = [pytest.param(device, strategy, id=f"{device}-{strategy}")
          for device in DEVICES for strategy in ("best_of_n", "beam_search")]


@pytest.mark.parametrize("device,strategy", PARAMS)
def test_prm_search_projection(device, strategy, machine, tables, tmp_path):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    count = int(os.environ.get("TTSCALE_BENCH_SEARCH_PROBLEMS") or DEFAULT_PROBLEMS[device])
    if TINY:
        count = 2
    n = SAMPLES[device]
    shapes = subset(count)
    search = Search(device, tmp_path)
    try:
        policy_params = matmul_params(search.policy_model)
        prm_params = sum(p.numel() for p in search.prm_model.layers.parameters())
        warm = Search.__dict__[strategy]
        warm(search, subset(1), BEAM_WIDTH * 2, random.Random(1))  # compile, allocate
        search.generated = search.scored = 0
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        warm(search, shapes, n, random.Random(0))
        sync()
        seconds = time.perf_counter() - start
        assert search.generated >= n * count, "every candidate generates"
        projected = seconds * expected_tokens(SHAPES, n) / expected_tokens(shapes, n)
        rates = machine(device)
        floor = floor_seconds(policy_params, prm_params, search.generated, search.scored,
                              rates.peak_flops)
        table = TABLE.format(device=device, dtype=str(search.dtype).removeprefix("torch."))
        tables.note(table, "projection: the subset's wall time scaled by MATH-500's solution "
                           "tokens over the subset's; floor: every generated and PRM-scored token "
                           "through 2 FLOPs per matrix-product parameter (layers; the policy's "
                           "LM head) at the peak rate, for the subset")
        tables.add(table, f"{strategy} N={n}", {
            "strategy": strategy, "N": n, "problems": count, "generated": search.generated,
            "PRM scored": search.scored, "wall s": seconds,
            "floor s": "—" if floor is None else floor,
            "of floor": "—" if floor is None else f"{floor / seconds:.0%}",
            "projected 500 min": projected / 60,
            "search-and-learn h": PUBLISHED_HOURS[strategy] if device == "cuda" else "—",
        }, {"seconds": seconds, "generated": search.generated, "scored": search.scored,
            "projected_s": projected, "floor_s": floor})
    finally:
        search.close()
    print(f"\n{table} | {strategy} N={n}, {count} problems: {seconds:.2f} s, "
          f"{search.generated} generated, {search.scored} PRM tokens; projected to 500 problems: "
          f"{projected / 60:.1f} min")
