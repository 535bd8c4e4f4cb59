"""One backend's run of ``ttscale bench throughput``, in a process of its own.

    python worker.py SPEC.json RESULT.json

Run as a file, not as a module: vLLM's interpreter (``.venv-vllm``) has no ttscale installed,
so this file imports only the standard library at the top and each backend's own package inside
its function. The harness (``throughput.py``) writes the spec: the backend, the model, the
dtype, the prompts as token ids, ``n``, the output length, the beam width or none, the seed,
the KV space and the thread count (also in the environment: ``OMP_NUM_THREADS``, and for vLLM
``VLLM_CPU_OMP_THREADS_BIND`` and ``VLLM_CPU_KVCACHE_SPACE``). The result: the wall-clock time
at which the engine was ready (built and warmed up on a small prompt of its own), the timed
call's seconds, the tokens it returned, the block size the engine ran with, and versions.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

# Run as a file, this folder comes first on sys.path: keep its modules from shadowing packages.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def run_ttscale(spec: dict) -> dict:
    import torch

    import ttscale
    from ttscale.llm import LLM
    from ttscale.sampling_params import SamplingParams

    torch.set_num_threads(spec["threads"])
    llm = LLM(spec["model"], device="cpu" if not torch.cuda.is_available() else None,
              dtype=spec["dtype"], seed=spec["seed"], block_size=spec["block_size"] or 16,
              kv_budget_bytes=int(spec["kv_space_gib"] * 2**30) if spec["kv_space_gib"] else None,
              prefix_caching=True, cpu_threads=spec.get("cpu_threads"))
    warm = SamplingParams(n=2, max_tokens=4, ignore_eos=True)
    llm.generate([spec["warmup_prompt"]], warm, use_tqdm=False)
    if spec["beam_width"]:
        llm.beam_search([spec["warmup_prompt"]],
                        ttscale.BeamSearchParams(beam_width=spec["beam_width"], max_tokens=2))
    ready = time.time()
    start = time.perf_counter()
    if spec["beam_width"]:
        params = ttscale.BeamSearchParams(beam_width=spec["beam_width"],
                                          max_tokens=spec["output_len"], ignore_eos=True)
        outs = llm.beam_search(spec["prompts"], params)
        elapsed = time.perf_counter() - start
        outputs = [len(o.sequences[0].token_ids) for o in outs]
    else:
        params = SamplingParams(n=spec["n"], temperature=1.0, top_p=1.0,
                                max_tokens=spec["output_len"], ignore_eos=True)
        outs = llm.generate(spec["prompts"], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        outputs = [sum(len(c.token_ids) for c in o.outputs) for o in outs]
    return {"ready": ready, "elapsed_time": elapsed, "output_tokens": outputs,
            "block_size": llm.engine.pool.block_size, "prefix_caching": True,
            "versions": {"ttscale": ttscale.__version__, "torch": torch.__version__}}


def run_vllm(spec: dict) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import BeamSearchParams

    options = {"block_size": spec["block_size"]} if spec["block_size"] else {}
    llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=spec["seed"],
              enable_prefix_caching=True, **options)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    warm = [TokensPrompt(prompt_token_ids=spec["warmup_prompt"])]
    llm.generate(warm, SamplingParams(n=2, max_tokens=4, ignore_eos=True), use_tqdm=False)
    if spec["beam_width"]:
        llm.beam_search(warm, BeamSearchParams(beam_width=spec["beam_width"], max_tokens=2))
    ready = time.time()
    start = time.perf_counter()
    if spec["beam_width"]:
        params = BeamSearchParams(beam_width=spec["beam_width"], max_tokens=spec["output_len"],
                                  ignore_eos=True)
        outs = llm.beam_search(prompts, params)
        elapsed = time.perf_counter() - start
        # a sequence's tokens include its prompt's
        outputs = [len(o.sequences[0].tokens) - len(p) for o, p in zip(outs, spec["prompts"])]
    else:
        params = SamplingParams(n=spec["n"], temperature=1.0, top_p=1.0,
                                max_tokens=spec["output_len"], ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        outputs = [sum(len(c.token_ids) for c in o.outputs) for o in outs]
    config = llm.llm_engine.vllm_config.cache_config
    return {"ready": ready, "elapsed_time": elapsed, "output_tokens": outputs,
            "block_size": config.block_size, "prefix_caching": bool(config.enable_prefix_caching),
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__}}


def run_transformers(spec: dict) -> dict:
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).eval()
    width, n, new = spec["beam_width"], spec["n"], spec["output_len"]

    def generate(prompts: list[list[int]], tokens: int, samples: int) -> int:
        ids = torch.tensor(prompts)
        options = ({"num_beams": width, "do_sample": False} if width else
                   {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "num_return_sequences": samples})
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0,
                                 **options)
        return out.shape[1] - ids.shape[1]

    generate([spec["warmup_prompt"]], 4, 2)
    ready = time.time()
    by_length: dict[int, list[int]] = {}  # one batched call per prompt length (no padding)
    for i, p in enumerate(spec["prompts"]):
        by_length.setdefault(len(p), []).append(i)
    outputs = [0] * len(spec["prompts"])
    start = time.perf_counter()
    for rows in by_length.values():
        length = generate([spec["prompts"][i] for i in rows], new, n)
        for i in rows:
            outputs[i] = length * (1 if width else n)
    elapsed = time.perf_counter() - start
    return {"ready": ready, "elapsed_time": elapsed, "output_tokens": outputs, "block_size": None,
            "prefix_caching": False,
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__}}


BACKENDS = {"ttscale": run_ttscale, "ttscale-fixed": run_ttscale, "vllm": run_vllm,
            "transformers": run_transformers}


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = BACKENDS[spec["backend"]](spec)
    result["versions"]["python"] = platform.python_version()
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with spawn: the guard is required
    sys.exit(main(sys.argv[1:]))
