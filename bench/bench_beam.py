"""Token-level beam search, the workload vLLM's published beam-search figure measures (issue 9 §3):
Llama-3-8B shape with random weights, 100 prompts of 256 tokens, 256 new tokens, beam width 4;
vLLM reached 551 tokens/s on one H100 (its PR #8726, prefix caching on). The goal is 50x that.

Each step decodes one token of every beam with its top ``2 × width`` log-probabilities (one
window, one host read), and each prompt keeps the ``width`` best (beam, token) continuations by
cumulative log-probability. A kept continuation forks its beam (block tables shared, nothing
copied) with the chosen token pending; the step's own sample is taken back first
(``Engine.drop_last_sample``), and beams nobody continues are freed. EOS is ignored, so every
beam runs the 256 steps. Tokens/s counts each prompt's final output (100 × 256 tokens), as a
client of ``generate(beam_width=4)`` receives them; the beams' tokens (4x that) are printed
beside it. The floor: every step reads the weights once, each prompt's KV once, and every
beam's own KV (memory-bound), as ``bench/RESULTS.md`` works out.

Run: ``TTSCALE_BENCH_DEVICES=cuda pytest bench/bench_beam.py --benchmark-enable -s``
(``TTSCALE_BENCH_BEAM_PROMPTS`` sets the prompts, default 100 on a GPU); ``TTSCALE_BENCH_TINY=1``
for tiny shapes.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import pytest
import torch
from bench_search import random_model
from settings import DEVICES, TINY, TINY_DIMS

WIDTH = 4
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
}
SMALL = {**LLAMA3_8B, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096}
TINY_SHAPE = {**SMALL, **TINY_DIMS}
# (model, prompts, prompt length, new tokens) per device.
WORKLOADS = {"cuda": (LLAMA3_8B, 100, 256, 256), "cpu": (SMALL, 8, 256, 64)}
if TINY:
    WORKLOADS = {"cuda": (TINY_SHAPE, 2, 24, 6), "cpu": (TINY_SHAPE, 2, 24, 6)}
VLLM_TOKENS_PER_S = 551


def beam_search(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's best beam's tokens after ``new_tokens`` steps."""
    from ttscale.sampling_params import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens + 1, ignore_eos=True,
                            logprobs=2 * WIDTH)
    kv_prompts = engine.add_many(prompts)
    beams = [[(0.0, seq)] for seq in (engine.fork(p, 1)[0] for p in kv_prompts)]
    for _ in range(new_tokens):
        live = [seq for group in beams for _, seq in group]
        engine.decode(live, greedy, max_new_tokens=1)
        next_beams = []
        for group in beams:
            options = sorted(((score + lp, -i, token) for i, (score, seq) in enumerate(group)
                              for token, lp in seq.top_logprobs[-1]), reverse=True)[:WIDTH]
            for _, seq in group:
                engine.drop_last_sample(seq)
            kept = []
            for score, neg, token in options:
                child = engine.fork(group[-neg][1], 1)[0]
                engine.extend(child, [token])
                kept.append((score, child))
            engine.free([seq for _, seq in group])
            next_beams.append(kept)
        beams = next_beams
    best = [max(group, key=lambda x: x[0])[1] for group in beams]
    out = [list(seq.tokens[1:]) for seq in best]
    engine.free([seq for group in beams for _, seq in group])
    for p in kv_prompts:
        engine.free_prompt(p)
    return out


def floor_seconds(config: dict, prompts: int, prompt_len: int, new_tokens: int, model,
                  bandwidth: float, peak: float | None, size: int) -> float:
    """The prompts' prefill (compute) plus every step's max(bytes / bandwidth, FLOPs / peak):
    the weights but the embedding table (gathered), each prompt's KV once, every beam's own KV;
    2 FLOPs per matrix-product parameter (layers and LM head) per beam."""
    kv_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * (
        config["hidden_size"] // config["num_attention_heads"]) * size
    layers = sum(p.numel() for p in model.layers.parameters())
    head = model.lm_head.numel()
    total = 2 * layers * prompts * prompt_len / peak if peak else 0.0
    for t in range(new_tokens):
        nbytes = ((layers + head) * size + prompts * prompt_len * kv_token
                  + prompts * WIDTH * (t + 1) * kv_token)
        flops = 2 * (layers + head) * prompts * WIDTH
        total += max(nbytes / bandwidth, flops / peak if peak else 0.0)
    return total


@pytest.mark.parametrize("device", DEVICES)
def test_token_beam_search(device, machine, tables, tmp_path):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ttscale.engine.engine import Engine

    config, prompts, prompt_len, new_tokens = WORKLOADS[device]
    prompts = int(os.environ.get("TTSCALE_BENCH_BEAM_PROMPTS") or prompts)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = random_model(config, device, dtype, Path(tmp_path) / "model")
    params = sum(p.numel() for p in model.parameters())
    engine = Engine(model, kv_budget_bytes=1 << 30) if device == "cpu" else Engine(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config["vocab_size"], (prompts, prompt_len), generator=gen).tolist()
    beam_search(engine, ids[:1], 2)  # warm-up: compile, capture, allocate
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = beam_search(engine, ids, new_tokens)
    sync()
    seconds = time.perf_counter() - start
    assert [len(o) for o in out] == [new_tokens] * prompts
    rates = machine(device)
    size = torch.empty((), dtype=dtype).element_size()
    floor = floor_seconds(config, prompts, prompt_len, new_tokens, model, rates.bandwidth,
                          rates.peak_flops, size)
    dtype_name = str(dtype).removeprefix("torch.")
    table = f"token-level beam search, width {WIDTH} ({device}, {dtype_name})"
    tables.note(table, "output tokens/s: each prompt's final beam (prompts x new tokens) over the "
                       "wall time, prefill included; floor: weights + prompt KV once + every "
                       "beam's KV a step, or FLOPs, whichever is larger")
    output = prompts * new_tokens
    cells = {"workload": f"{params / 1e9:.2f}B x {prompts} prompts P={prompt_len} T={new_tokens}",
             "wall s": seconds, "output tok/s": output / seconds,
             "beam tok/s": WIDTH * output / seconds, "floor s": floor,
             "of floor": f"{floor / seconds:.0%}"}
    if device == "cuda" and not TINY:
        cells["vs vLLM 551 tok/s"] = f"{output / seconds / VLLM_TOKENS_PER_S:.0f}x"
    tables.add(table, cells["workload"], cells, {"seconds": seconds, "floor_s": floor,
                                                 "config": json.dumps(config)})
    print(f"\n{table} | {cells['workload']}: {output / seconds:.0f} output tokens/s "
          f"({seconds:.2f} s, {floor / seconds:.0%} of floor)")
    if engine.memory_lease is not None:
        engine.memory_lease.release()
    del engine, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
