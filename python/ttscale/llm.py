"""``LLM``: vLLM's surface over the shared-prefix engine.

    llm = ttscale.LLM("path/to/model")
    outs = llm.generate(["What is 2+2?"], ttscale.SamplingParams(n=8, temperature=0.8))
    outs[0].outputs[3].text

    rid = llm.add_request("What is 2+2?", ttscale.SamplingParams(n=4))  # joins at the next step
    while llm.has_unfinished_requests():
        for out in llm.step():          # the requests that progressed, cumulative outputs
            print(out.request_id, out.finished, [c.text for c in out.outputs])

The ``n`` samples of a prompt share its prefilled KV. Every request goes through one scheduler
(:mod:`ttscale.engine.scheduler`): requests join the running batch at any step, sequences run
when their next window fits the pool, and finished sequences free their blocks at once, so any
number of prompts and samples completes in bounded memory. ``generate`` is a loop over the same
steps, so concurrent calls from several threads share them.
"""

from __future__ import annotations

import itertools
import numbers
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ttscale._checks import check_flag, check_int, check_text
from ttscale.engine.engine import Engine, check_engine_arguments
from ttscale.engine.scheduler import Scheduler
from ttscale.engine.work import EngineStats, Request
from ttscale.engine.sequence import Sequence
from ttscale.engine.stops import find_stop
from ttscale.errors import InvalidArgument, ModelLoadError, invalid
from ttscale.model import load_model, load_tokenizer, read_config
from ttscale.model.loader import check_load_arguments
from ttscale.sampling_params import SamplingParams, check_seed

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "EngineStats"]

# Most samples of one request or search: a bound, so that a typo (n=100000) is refused at once
# instead of running for hours; the server's --max-n has the same default.
DEFAULT_MAX_N = 1024


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
    """A request's state: all ``n`` completions, sorted by index, each the tokens so far."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    request_id: str = ""
    finished: bool = False


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
    block_size, window, backend, cuda_graphs, max_decode_seqs, cpu_threads
        Passed to :class:`~ttscale.engine.Engine` (KV block size, decode steps per host read,
        attention backend, CUDA-graph replay of decode steps: on by default on a GPU, most
        sequences in one decode step: 4096 by default on a GPU, the CPU threads of each step:
        by default measured, see :mod:`ttscale.engine.threads`).
    prefix_caching : bool
        Share the full KV blocks of identical prompt prefixes across requests (default on).
    max_n : int
        Most samples one request (``SamplingParams.n``) or one search (a strategy's ``n``) may
        ask for (default 1024, the server's ``--max-n``); more is refused at once, naming ``n``.
        Below it, a request the pool cannot hold at once runs piecewise.

    Every argument is checked before anything is loaded (:mod:`ttscale.errors`).
    """

    def __init__(self, model: str | Path, device=None, dtype=None, seed: int = 0, *,
                 kv_budget_bytes: int | None = None, memory_share: float | None = None,
                 block_size: int = 16, window: int | None = None, backend: str | None = None,
                 cuda_graphs: bool | None = None, max_decode_seqs: int | None = None,
                 prefix_caching: bool = True, max_n: int = DEFAULT_MAX_N,
                 cpu_threads: int | None = None):
        check_load_arguments("model", model, device, dtype)
        check_engine_arguments(kv_budget_bytes=kv_budget_bytes, memory_share=memory_share,
                               block_size=block_size, window=window, backend=backend,
                               cuda_graphs=cuda_graphs, max_decode_seqs=max_decode_seqs,
                               cpu_threads=cpu_threads)
        seed = check_seed(seed)
        check_flag("prefix_caching", prefix_caching)
        self.max_n = check_int("max_n", max_n, low=1)
        model_dir = Path(model)
        config = read_config(model_dir)
        if config.head != "lm":
            raise ModelLoadError(
                f"model: {model_dir} holds a {config.architecture}, a reward model (a "
                f"{config.head!r} head, no language-model head); it cannot generate: load it "
                "with ttscale.PRM and pass it as a strategy's verifier")
        self.model = load_model(model_dir, device=device, dtype=dtype)
        self.tokenizer = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").exists() else None
        self.engine = Engine(self.model, self.tokenizer, kv_budget_bytes=kv_budget_bytes,
                             memory_share=memory_share, block_size=block_size, seed=seed,
                             window=window, backend=backend, cuda_graphs=cuda_graphs,
                             max_decode_seqs=max_decode_seqs, cpu_threads=cpu_threads)
        self.seed = seed
        self.scheduler = Scheduler(self.engine, prefix_caching=prefix_caching)
        self._request_ids = itertools.count()
        self._unseeded_streams = itertools.count()  # unseeded requests never share a stream

    def encode(self, prompt: str | Seq[int], name: str = "prompts") -> list[int]:
        """A prompt's token ids: text through the tokenizer, or token ids as given (integers:
        a float, a bool or a string is not a token id; integer tensors and arrays are taken)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise invalid(name, "text prompts need a tokenizer.json in the model directory")
            if not prompt:
                raise invalid(name, "empty prompt")
            return self.tokenizer.encode(prompt)
        if hasattr(prompt, "tolist") and hasattr(prompt, "dtype"):  # a tensor or an array
            if prompt.ndim != 1:
                raise invalid(name, f"expected a 1-D array of token ids, got shape "
                                    f"{tuple(prompt.shape)}")
            if getattr(prompt.dtype, "is_floating_point", False) or str(prompt.dtype).startswith(
                    ("float", "bool", "torch.bool", "complex")):
                raise invalid(name, f"token ids must be integers, got a {prompt.dtype} array")
            prompt = prompt.reshape(-1).tolist()
        if not isinstance(prompt, (list, tuple)):
            raise invalid(name, f"expected text or a list of token ids, got {type(prompt).__name__}")
        bad = [t for t in prompt if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if bad:
            raise invalid(name, f"token ids must be integers, got {bad[0]!r}")
        return [int(t) for t in prompt]

    # ------------------------------------------------------------------------------------------
    # The step API (vLLM's names)

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; it joins the running batch at the next :meth:`step`. Returns its id.

        ``prompt``: text or token ids. With ``params.seed`` set, the request's samples depend on
        the seed and the prompt only, not on what runs beside them. A request that can never fit
        the KV pool, or the model's positions, is refused here with the argument's name.
        """
        params = self._check_params(params, "params")
        if request_id is not None:
            check_text("request_id", request_id)
        ids = self.encode(prompt, "prompt")
        self._check_prompt("prompt", ids, params, self._worst_case(params))
        request = self._request(prompt, ids, params, request_id, stream=0)
        self.scheduler.add(request)
        return request.request_id

    def step(self) -> list[RequestOutput]:
        """One scheduler step: a decode window for every sequence that fits. Returns the requests
        added with :meth:`add_request` that progressed (since the last step), each with all its
        ``n`` completions so far; ``finished`` says whether it is done."""
        self.scheduler.step()
        return [self._output(r) for r in self.scheduler.take_progressed()]

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks at once. Unknown id: ``UnknownRequest``, a
        ``KeyError`` (and ``InvalidArgument``) naming it."""
        check_text("request_id", request_id)
        self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """Running, waiting and preempted requests, the pool's blocks, steps and host reads, as of
        the last step (nothing is read from the device)."""
        return self.scheduler.stats()

    # ------------------------------------------------------------------------------------------

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]], sampling_params: SamplingParams | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Sample ``sampling_params.n`` completions for each prompt (strings or token-id lists).

        With ``sampling_params.seed`` set, a call's samples depend only on the seed, the prompt's
        position in ``prompts`` and the sample's index: the same call gives the same result,
        whatever else runs beside it. Without it, every call draws new samples.
        Every prompt is checked before any work starts. The call's requests go through the
        scheduler's steps like any other, so calls from several threads share them.
        """
        params = self._check_params(sampling_params, "sampling_params")
        check_flag("use_tqdm", use_tqdm)
        if not isinstance(prompts, str) and hasattr(prompts, "tolist") and hasattr(prompts, "dtype"):
            # a tensor or an array (a numpy string is a str, taken as text)
            if prompts.ndim not in (1, 2):
                raise invalid("prompts", "expected token ids as a 1-D array (one prompt) or a 2-D "
                                         f"one (a prompt a row), got shape {tuple(prompts.shape)}")
            prompts = [prompts] if prompts.ndim == 1 else list(prompts)  # one prompt, or one a row
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], numbers.Integral)
                                        and not isinstance(prompts[0], bool)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise invalid("prompts", "expected a prompt (text or token ids) or a non-empty list of them, "
                                     f"got {prompts!r:.60}")
        ids = [self.encode(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        worst_case = self._worst_case(params)
        for i, prompt in enumerate(ids):
            self._check_prompt(f"prompts[{i}]", prompt, params, worst_case)
        requests = [self._request(p, i, params, None, stream=k, public=False)
                    for k, (p, i) in enumerate(zip(prompts, ids, strict=True))]
        progress = tqdm(total=len(ids) * params.n, desc="generate", unit="seq", disable=not use_tqdm)
        start, tokens_before = time.perf_counter(), self.engine.generated_tokens
        done = 0
        try:
            for request in requests:
                self.scheduler.add(request)
            while not all(r.finished for r in requests):
                self.scheduler.step()  # other callers' requests advance too: their step() reports them
                finished = sum(s.finish_reason is not None for r in requests for s in r.seqs)
                progress.update(finished - done)
                done = finished
                elapsed = time.perf_counter() - start
                progress.set_postfix(tok_s=f"{(self.engine.generated_tokens - tokens_before) / max(elapsed, 1e-9):.0f}")
        except BaseException:
            for request in requests:  # nothing of a failed call stays in the pool
                if not request.finished:
                    self.scheduler.abort(request.request_id)
            raise
        finally:
            progress.close()
        return [self._output(r) for r in requests]

    def beam_search(self, prompts, params=None) -> list:
        """Token-level beam search, as vLLM's ``LLM.beam_search``: one ``BeamSearchOutput`` per
        prompt (text or token ids), its ``params.beam_width`` best sequences best first
        (:mod:`ttscale.token_beam`)."""
        from ttscale.token_beam import beam_search

        return beam_search(self, prompts, params)

    # ------------------------------------------------------------------------------------------

    def _check_params(self, params, name: str) -> SamplingParams:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise invalid(name, f"expected SamplingParams, got {type(params).__name__}")
        if params.n > self.max_n:
            raise invalid("n", f"at most {self.max_n} samples a request (the LLM's max_n), got "
                               f"{params.n}")
        if params.stop_strings and self.tokenizer is None:
            raise invalid(name, "stop strings need a tokenizer.json in the model directory")
        self.engine.thinking.control(params)  # its texts in the model's tokens, or an error
        return params

    def _worst_case(self, params: SamplingParams) -> int:
        """KV blocks one sample needs at ``max_tokens``: the least a request needs to progress."""
        blocks = self.engine.pool
        worst_case = blocks.blocks_for(params.max_tokens + 1)
        if worst_case > blocks.num_blocks:
            raise invalid(
                "max_tokens", f"one sequence of {params.max_tokens} tokens needs {worst_case} KV "
                f"blocks, the pool has {blocks.num_blocks}; lower max_tokens or raise kv_budget_bytes")
        return worst_case

    def _request(self, prompt, ids: list[int], params: SamplingParams, request_id: str | None,
                 stream: int, public: bool = True) -> Request:
        if request_id is None:
            request_id = str(next(self._request_ids))
        if params.seed is not None:
            seed, stream = params.seed, stream
        else:
            seed, stream = self.seed, (1 << 40) + next(self._unseeded_streams)
        return Request(request_id, prompt if isinstance(prompt, str) else None, ids, params,
                       seed=seed, stream=stream, public=public)

    def _output(self, request: Request) -> RequestOutput:
        params = request.params
        if request.seqs:
            outputs = [self._completion(k, seq, params) for k, seq in enumerate(request.seqs)]
        else:
            outputs = [CompletionOutput(k, "", [], 0.0, None, [] if params.logprobs else None)
                       for k in range(params.n)]
        return RequestOutput(request.prompt, request.prompt_ids, outputs, request.request_id,
                             request.finished)

    def _check_prompt(self, name: str, ids: list[int], params: SamplingParams,
                      worst_case: int) -> None:
        """A prompt's ids, its length with ``max_tokens`` against the model's positions, and its
        room in the KV pool beside one sample, checked before a call starts."""
        engine = self.engine
        try:
            engine.check_prompt(name, ids)
        except InvalidArgument:
            raise
        except ValueError as error:
            raise InvalidArgument(str(error), param=name) from None
        positions = self.model.max_positions
        if len(ids) + params.max_tokens - 1 > positions:
            raise invalid(
                "max_tokens", f"{name} has {len(ids)} tokens, so at most {positions - len(ids) + 1} "
                f"new tokens fit the model's {positions} positions, got {params.max_tokens}")
        need = engine.pool.blocks_for(len(ids) - 1) + worst_case
        if need > engine.pool.num_blocks:
            raise invalid(
                name, f"its prompt and one sample of max_tokens={params.max_tokens} need {need} "
                f"KV blocks, the pool has {engine.pool.num_blocks}; raise kv_budget_bytes")

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

