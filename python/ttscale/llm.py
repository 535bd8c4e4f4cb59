"""``LLM.generate``: vLLM's surface over the shared-prefix engine.

    llm = ttscale.LLM("path/to/model")
    outs = llm.generate(["What is 2+2?"], ttscale.SamplingParams(n=8, temperature=0.8))
    outs[0].outputs[3].text

The ``n`` samples of a prompt share its prefilled KV. Work streams through the KV pool: a
sequence starts only when the pool can hold it to ``max_tokens``, and finished sequences free
their blocks at once, so any number of prompts and samples completes in bounded memory.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ttscale.engine.engine import Engine
from ttscale.engine.sequence import Sequence
from ttscale.engine.stops import find_stop
from ttscale.model import load_model, load_tokenizer
from ttscale.sampling_params import SamplingParams

# Unseeded generate calls number their sequences from here on (a seeded call and a search
# number theirs from 0 and by stream key, below 2**34), so their random streams never meet.
UNSEEDED_SEQUENCES = 1 << 36


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    finish_reason: str | None
    logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    """A local model ready to generate.

    Parameters
    ----------
    model : str or Path
        A local Hugging Face directory (config.json, safetensors, optionally tokenizer.json).
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    dtype : str or torch.dtype, optional
        Default: bf16 on a GPU, fp32 on the CPU.
    seed : int
        Sampling seed when ``SamplingParams.seed`` is None.
    kv_budget_bytes : int, optional
        KV pool size (default: on a GPU the process's KV budget for the device, 0.9 of its free
        memory, or what other engines left of it; 2 GiB on the CPU).
    memory_share : float, optional
        The share of the device's KV budget to lease instead (see :mod:`ttscale.engine.memory`).
    block_size, window, backend, cuda_graphs, max_decode_seqs
        Passed to :class:`~ttscale.engine.Engine` (KV block size, decode steps per host read,
        attention backend, CUDA-graph replay of decode steps: on by default on a GPU, most
        sequences in one decode step: 4096 by default on a GPU).
    """

    def __init__(self, model: str | Path, device=None, dtype=None, seed: int = 0, *,
                 kv_budget_bytes: int | None = None, memory_share: float | None = None,
                 block_size: int = 16, window: int | None = None, backend: str | None = None,
                 cuda_graphs: bool | None = None, max_decode_seqs: int | None = None):
        model_dir = Path(model)
        self.model = load_model(model_dir, device=device, dtype=dtype)
        self.tokenizer = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").exists() else None
        self.engine = Engine(self.model, self.tokenizer, kv_budget_bytes=kv_budget_bytes,
                             memory_share=memory_share, block_size=block_size, seed=seed,
                             window=window, backend=backend, cuda_graphs=cuda_graphs,
                             max_decode_seqs=max_decode_seqs)
        self._unseeded_next = UNSEEDED_SEQUENCES  # where unseeded generate calls number from

    def encode(self, prompt: str | Seq[int], name: str = "prompts") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{name}: text prompts need a tokenizer.json in the model directory")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            return [int(t) for t in prompt.reshape(-1)]
        return [int(t) for t in prompt]

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]], sampling_params: SamplingParams | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Sample ``sampling_params.n`` completions for each prompt (strings or token-id lists).

        With ``sampling_params.seed`` set, a call's samples depend only on the seed, the prompt's
        position in ``prompts`` and the sample's index: the same call gives the same result.
        Without it, draws follow the engine's seed and go on from the previous call's.
        Every prompt is checked before any work starts.
        """
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(
                f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        if hasattr(prompts, "tolist") and not isinstance(prompts, str):
            prompts = prompts.tolist()  # a tensor or array: one prompt's ids, or one per row
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        engine = self.engine
        if params.stop_strings and self.tokenizer is None:
            raise ValueError(
                "sampling_params: stop strings need a tokenizer.json in the model directory")
        ids = [self.encode(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        worst_case = engine.blocks.blocks_for(params.max_tokens + 1)
        if worst_case > engine.blocks.num_blocks:
            raise ValueError(
                f"max_tokens: one sequence of {params.max_tokens} tokens needs {worst_case} KV blocks, "
                f"the pool has {engine.blocks.num_blocks}; lower max_tokens or raise kv_budget_bytes"
            )
        for i, prompt in enumerate(ids):
            self._check_prompt(f"prompts[{i}]", prompt, params, worst_case)
        results = [RequestOutput(p if isinstance(p, str) else None, i)
                   for p, i in zip(prompts, ids)]
        # A seeded call numbers its sequences from 0 (the same call replays its samples); an
        # unseeded one goes on from the previous unseeded call, in a range of its own, so it
        # never repeats the streams of a seeded call or a search in between.
        seeded = params.seed is not None
        engine.number_sequences_from(0 if seeded else self._unseeded_next)
        added: list = []  # problems prefilled by this call
        waiting = deque(range(len(ids)))  # prompts not yet prefilled
        queued: deque[tuple[int, int, Sequence]] = deque()  # (prompt, sample index, sequence)
        running: list[tuple[int, int, Sequence]] = []
        left = [params.n] * len(ids)
        progress = tqdm(total=len(ids) * params.n, desc="generate", unit="seq", disable=not use_tqdm)
        start, tokens_before = time.perf_counter(), engine.generated_tokens
        limits: dict[Sequence, int] = {}
        try:
            while waiting or queued or running:
                # Start sequences while the pool can take each to max_tokens (no deadlock later).
                committed = sum(worst_case - len(s.block_table) for _, _, s in running)
                while queued or waiting:
                    if not queued:  # prefill the next prompt once its blocks and one sample fit
                        prompt_blocks = engine.blocks.blocks_for(len(ids[waiting[0]]) - 1)
                        if engine.blocks.num_free - committed < prompt_blocks + worst_case:
                            break
                        index = waiting.popleft()
                        problem = engine.add(ids[index])
                        added.append(problem)
                        queued.extend((index, k, s) for k, s in enumerate(engine.fork(problem, params.n)))
                    if engine.blocks.num_free - committed < worst_case:
                        break
                    item = queued.popleft()
                    running.append(item)
                    limits[item[2]] = params.max_tokens
                    committed += worst_case
                if not running:
                    raise RuntimeError("generate: no sequence fits in the KV pool (see max_tokens)")
                still = set(engine.step([s for _, _, s in running], params, params.stop_strings, limits))
                for item in [r for r in running if r[2] not in still]:
                    p, k, seq = item
                    results[p].outputs.append(self._completion(k, seq, params))
                    engine.free([seq])
                    del limits[seq]
                    left[p] -= 1
                    if left[p] == 0:
                        engine.free_problem(seq.problem)
                    progress.update(1)
                running = [r for r in running if r[2] in still]
                elapsed = time.perf_counter() - start
                progress.set_postfix(tok_s=f"{(engine.generated_tokens - tokens_before) / max(elapsed, 1e-9):.0f}")
        except BaseException:
            # nothing of a failed call stays in the pool
            engine.free([s for _, _, s in running + list(queued)])
            for problem in added:
                if problem.num_sequences == 0:
                    engine.free_problem(problem)
            raise
        finally:
            progress.close()
            if not seeded:
                self._unseeded_next = engine.next_sequence_number
        for r in results:
            r.outputs.sort(key=lambda c: c.index)
        return results

    def _check_prompt(self, name: str, ids: list[int], params: SamplingParams,
                      worst_case: int) -> None:
        """A prompt's ids, its length with ``max_tokens`` against the model's positions, and its
        room in the KV pool beside one sample, checked before a call starts."""
        engine = self.engine
        engine.check_prompt(name, ids)
        positions = self.model.max_positions
        if len(ids) + params.max_tokens - 1 > positions:
            raise ValueError(
                f"max_tokens: {name} has {len(ids)} tokens, so at most {positions - len(ids) + 1} "
                f"new tokens fit the model's {positions} positions, got {params.max_tokens}"
            )
        need = engine.blocks.blocks_for(len(ids) - 1) + worst_case
        if need > engine.blocks.num_blocks:
            raise ValueError(
                f"{name}: its prompt and one sample of max_tokens={params.max_tokens} need {need} "
                f"KV blocks, the pool has {engine.blocks.num_blocks}; raise kv_budget_bytes"
            )

    def _completion(self, index: int, seq: Sequence, params: SamplingParams) -> CompletionOutput:
        token_ids = seq.output_ids
        text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""
        if params.stop_strings and seq.finish_reason == "stop":
            cut = find_stop(text, params.stop_strings)
            text = text if cut is None else text[:cut]
        return CompletionOutput(
            index=index, text=text, token_ids=token_ids, cumulative_logprob=float(sum(seq.logprobs)),
            finish_reason=seq.finish_reason, logprobs=seq.top_logprobs if params.logprobs else None,
        )
