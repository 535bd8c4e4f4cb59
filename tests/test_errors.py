"""One error vocabulary: every bad input to the public API raises an ``InvalidArgument`` whose
``param`` names the argument as the caller wrote it, and whose message names it too.

One row per bad input: its name, the call (given the toy models, loaded once, and a folder of
files), and the ``param`` expected. The command line's rows are in ``test_errors_cli.py``.
"""

from __future__ import annotations

import json
import time
from functools import cached_property

import numpy as np
import pytest
import torch

import ttscale
from ttscale import evaluate
from ttscale.errors import InvalidArgument, TTScaleError
from ttscale.toy import policy_dir, prm_dir

PROBLEM = "Q: (88-5)-18\n"
SP = ttscale.SamplingParams
MS = dict(format="math-shepherd", device="cpu", kv_budget_bytes=16 << 20)  # the toy PRM's


class Models:
    """What the rows call: the toy policy and PRM (loaded on first use, once per module) and a
    folder of files."""

    def __init__(self, folder):
        self.folder = folder

    @cached_property
    def llm(self):
        return ttscale.LLM(policy_dir(), device="cpu", kv_budget_bytes=16 << 20)

    @cached_property
    def prm(self):
        return ttscale.PRM(prm_dir(), **MS)

    @cached_property
    def reward_head_dir(self):
        """A folder whose config.json describes a two-class reward model (a PRM's checkpoint)."""
        folder = self.folder / "reward_head"
        folder.mkdir()
        config = json.loads((policy_dir() / "config.json").read_text())
        config["architectures"] = ["Qwen2ForProcessRewardModel"]
        config["model_type"] = "qwen2"
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    @cached_property
    def data(self):
        path = self.folder / "data.jsonl"
        path.write_text('{"problem": "Q: 1+1\\n", "answer": "2"}\n')
        return path

    @cached_property
    def problems(self):
        return evaluate.read_problems(self.data)

    @property
    def out(self):
        return self.folder / "out.jsonl"

    def search(self, **options):
        """Strategy options every search row shares (the toy task's prompt and steps)."""
        return dict(prompt_fn=lambda p: p, step_delimiter="\n", progress=False) | options


@pytest.fixture(scope="module")
def models(one_thread, tmp_path_factory):
    return Models(tmp_path_factory.mktemp("errors"))


def no_search(batch):
    raise AssertionError("a bad argument must be refused before any search")


SAMPLING = [
    ("n=0", lambda m: SP(n=0), "n"),
    ("n=True", lambda m: SP(n=True), "n"),
    ("n=2.0", lambda m: SP(n=2.0), "n"),
    ("n=np.float64", lambda m: SP(n=np.float64(2)), "n"),
    ("temperature<0", lambda m: SP(temperature=-1), "temperature"),
    ("temperature=str", lambda m: SP(temperature="hot"), "temperature"),
    ("temperature=None", lambda m: SP(temperature=None), "temperature"),
    ("temperature=nan", lambda m: SP(temperature=float("nan")), "temperature"),
    ("temperature=inf", lambda m: SP(temperature=float("inf")), "temperature"),
    ("top_p=0", lambda m: SP(top_p=0), "top_p"),
    ("top_p>1", lambda m: SP(top_p=1.5), "top_p"),
    ("top_p=str", lambda m: SP(top_p="0.9"), "top_p"),
    ("top_k<-1", lambda m: SP(top_k=-2), "top_k"),
    ("top_k=1.5", lambda m: SP(top_k=1.5), "top_k"),
    ("top_k=np.float32", lambda m: SP(top_k=np.float32(1)), "top_k"),
    ("min_p>1", lambda m: SP(min_p=1.5), "min_p"),
    ("min_p=str", lambda m: SP(min_p="0"), "min_p"),
    ("max_tokens=0", lambda m: SP(max_tokens=0), "max_tokens"),
    ("max_tokens=str", lambda m: SP(max_tokens="10"), "max_tokens"),
    ("max_tokens=True", lambda m: SP(max_tokens=True), "max_tokens"),
    ("max_tokens=1e3", lambda m: SP(max_tokens=1e3), "max_tokens"),
    ("seed<0", lambda m: SP(seed=-1), "seed"),
    ("seed=1.5", lambda m: SP(seed=1.5), "seed"),
    ("seed=2**64", lambda m: SP(seed=2**64), "seed"),
    ("seed=str", lambda m: SP(seed="1"), "seed"),
    ("logprobs>20", lambda m: SP(logprobs=21), "logprobs"),
    ("logprobs=True", lambda m: SP(logprobs=True), "logprobs"),
    ("stop=int", lambda m: SP(stop=7), "stop"),
    ("stop=dict", lambda m: SP(stop={"a": 1}), "stop"),
    ("stop=['']", lambda m: SP(stop=[""]), "stop"),
    ("stop=[str, int]", lambda m: SP(stop=["a", 1]), "stop"),
    ("stop=bytes", lambda m: SP(stop=b"a"), "stop"),
    ("ignore_eos=str", lambda m: SP(ignore_eos="no"), "ignore_eos"),
    ("ignore_eos=1", lambda m: SP(ignore_eos=1), "ignore_eos"),
    ("thinking_token_budget<0", lambda m: SP(thinking_token_budget=-1), "thinking_token_budget"),
    ("thinking_token_budget=1.5", lambda m: SP(thinking_token_budget=1.5),
     "thinking_token_budget"),
    ("min_thinking_tokens above the budget", lambda m: SP(
        thinking_token_budget=4, min_thinking_tokens=5), "min_thinking_tokens"),
    ("min_thinking_tokens=True", lambda m: SP(min_thinking_tokens=True), "min_thinking_tokens"),
    ("max_extensions<0", lambda m: SP(min_thinking_tokens=3, max_extensions=-1),
     "max_extensions"),
    ("max_extensions without a minimum", lambda m: SP(max_extensions=2), "max_extensions"),
    ("continue_text=''", lambda m: SP(min_thinking_tokens=3, continue_text=""), "continue_text"),
    ("continue_text=[1.5]", lambda m: SP(min_thinking_tokens=3, continue_text=[1.5]),
     "continue_text"),
    ("continue_text without a minimum", lambda m: SP(continue_text="ok"), "continue_text"),
    ("thinking_end=int", lambda m: SP(thinking_token_budget=4, thinking_end=7), "thinking_end"),
    ("thinking_end without a budget", lambda m: SP(thinking_end="</s>"), "thinking_end"),
]

LLM = ttscale.LLM
CONSTRUCTION = [
    ("LLM model=None", lambda m: LLM(None), "model"),
    ("LLM model=int", lambda m: LLM(123), "model"),
    ("LLM model missing", lambda m: LLM("/no/such/model"), "model"),
    ("LLM model is a file", lambda m: LLM(policy_dir() / "config.json"), "model"),
    ("LLM model is a reward model", lambda m: LLM(m.reward_head_dir, device="cpu"), "model"),
    ("LLM device=tpu", lambda m: LLM(policy_dir(), device="tpu"), "device"),
    ("LLM device=float", lambda m: LLM(policy_dir(), device=3.5), "device"),
    ("LLM device unavailable", lambda m: LLM(policy_dir(), device="cuda")
     if not torch.cuda.is_available() else LLM(policy_dir(), device="cuda:99"), "device"),
    ("LLM dtype=int8", lambda m: LLM(policy_dir(), dtype="int8"), "dtype"),
    ("LLM dtype=torch.int8", lambda m: LLM(policy_dir(), device="cpu", dtype=torch.int8), "dtype"),
    ("LLM fp16 on the CPU", lambda m: LLM(policy_dir(), device="cpu", dtype="float16"), "dtype"),
    ("LLM block_size=0", lambda m: LLM(policy_dir(), block_size=0), "block_size"),
    ("LLM block_size<0", lambda m: LLM(policy_dir(), block_size=-16), "block_size"),
    ("LLM block_size=str", lambda m: LLM(policy_dir(), block_size="16"), "block_size"),
    ("LLM block_size=24", lambda m: LLM(policy_dir(), block_size=24), "block_size"),
    ("LLM kv_budget_bytes=0", lambda m: LLM(policy_dir(), kv_budget_bytes=0), "kv_budget_bytes"),
    ("LLM kv_budget_bytes=float", lambda m: LLM(policy_dir(), kv_budget_bytes=1e6),
     "kv_budget_bytes"),
    ("LLM kv_budget_bytes holds no block", lambda m: LLM(policy_dir(), device="cpu",
                                                         kv_budget_bytes=10), "kv_budget_bytes"),
    ("LLM memory_share=2", lambda m: LLM(policy_dir(), memory_share=2), "memory_share"),
    ("LLM memory_share with kv_budget_bytes", lambda m: LLM(
        policy_dir(), kv_budget_bytes=1 << 20, memory_share=0.5), "memory_share"),
    ("LLM window=0", lambda m: LLM(policy_dir(), window=0), "window"),
    ("LLM seed<0", lambda m: LLM(policy_dir(), seed=-5), "seed"),
    ("LLM seed=True", lambda m: LLM(policy_dir(), seed=True), "seed"),
    ("LLM backend unknown", lambda m: LLM(policy_dir(), backend="nope"), "backend"),
    ("LLM backend=int", lambda m: LLM(policy_dir(), backend=3), "backend"),
    ("LLM cuda_graphs=str", lambda m: LLM(policy_dir(), cuda_graphs="no"), "cuda_graphs"),
    ("LLM cuda_graphs on the CPU", lambda m: LLM(policy_dir(), device="cpu", cuda_graphs=True),
     "cuda_graphs"),
    ("LLM prefix_caching=str", lambda m: LLM(policy_dir(), prefix_caching="no"),
     "prefix_caching"),
    ("LLM max_decode_seqs=0", lambda m: LLM(policy_dir(), max_decode_seqs=0), "max_decode_seqs"),
    ("LLM max_n=0", lambda m: LLM(policy_dir(), max_n=0), "max_n"),
    ("LLM max_n=True", lambda m: LLM(policy_dir(), max_n=True), "max_n"),
    ("PRM model_dir=None", lambda m: ttscale.PRM(None, format="math-shepherd"), "model_dir"),
    ("PRM model_dir missing", lambda m: ttscale.PRM("/no/such", format="math-shepherd"),
     "model_dir"),
    ("PRM format unknown", lambda m: ttscale.PRM(prm_dir(), format="nope", device="cpu"),
     "format"),
    ("PRM format=int", lambda m: ttscale.PRM(prm_dir(), format=3, device="cpu"), "format"),
    ("PRM format of another head", lambda m: ttscale.PRM(prm_dir(), format="skywork",
                                                         device="cpu"), "format"),
    ("PRM step_tag=''", lambda m: ttscale.PRM(prm_dir(), **MS, step_tag=""), "step_tag"),
    ("PRM step_tag=int", lambda m: ttscale.PRM(prm_dir(), **MS, step_tag=5), "step_tag"),
    ("PRM step_tag='+'", lambda m: ttscale.PRM(prm_dir(), **MS, step_tag="+"), "step_tag"),
    ("PRM step_tag of two tokens", lambda m: ttscale.PRM(prm_dir(), **MS, step_tag="1+"),
     "step_tag"),
    ("PRM good_token=bad_token", lambda m: ttscale.PRM(prm_dir(), **MS, good_token="-",
                                                       bad_token="-"), "bad_token"),
    ("PRM good_token=''", lambda m: ttscale.PRM(prm_dir(), **MS, good_token=""), "good_token"),
    ("PRM good_token of two tokens", lambda m: ttscale.PRM(prm_dir(), **MS, good_token="+-"),
     "good_token"),
    ("PRM bad_token=int", lambda m: ttscale.PRM(prm_dir(), **MS, bad_token=7), "bad_token"),
    ("PRM system_prompt for math-shepherd", lambda m: ttscale.PRM(prm_dir(), **MS,
                                                                  system_prompt="x"),
     "system_prompt"),
    ("PRM step_delimiter=''", lambda m: ttscale.PRM(prm_dir(), **MS, step_delimiter=""),
     "step_delimiter"),
    ("PRM step_delimiter=int", lambda m: ttscale.PRM(prm_dir(), **MS, step_delimiter=3),
     "step_delimiter"),
    ("PRM kv_budget_bytes=0", lambda m: ttscale.PRM(prm_dir(), format="math-shepherd",
                                                    kv_budget_bytes=0), "kv_budget_bytes"),
    ("PRM block_size=3", lambda m: ttscale.PRM(prm_dir(), **MS, block_size=3), "block_size"),
    ("PRM max_batch_tokens=str", lambda m: ttscale.PRM(prm_dir(), **MS, max_batch_tokens="8"),
     "max_batch_tokens"),
    ("PRM backend unknown", lambda m: ttscale.PRM(prm_dir(), **MS, backend="nope"), "backend"),
    ("PRM device=tpu", lambda m: ttscale.PRM(prm_dir(), format="math-shepherd", device="tpu"),
     "device"),
    ("PRM dtype=int8", lambda m: ttscale.PRM(prm_dir(), format="math-shepherd", dtype="int8"),
     "dtype"),
    ("ORM good_token=bad_token", lambda m: ttscale.ORM(prm_dir(), **MS, good_token="+",
                                                       bad_token="+"), "bad_token"),
    ("RuleVerifier extract=int", lambda m: ttscale.RuleVerifier(extract=3), "extract"),
    ("RuleVerifier equal=str", lambda m: ttscale.RuleVerifier(equal="=="), "equal"),
    ("RuleVerifier intermediate>1", lambda m: ttscale.RuleVerifier(intermediate=2.0),
     "intermediate"),
    ("RuleVerifier intermediate=str", lambda m: ttscale.RuleVerifier(intermediate="0.5"),
     "intermediate"),
]

GENERATING = [
    ("generate None", lambda m: m.llm.generate(None), "prompts"),
    ("generate int", lambda m: m.llm.generate(42), "prompts"),
    ("generate []", lambda m: m.llm.generate([]), "prompts"),
    ("generate nested ids", lambda m: m.llm.generate([[[1, 2]]]), "prompts"),
    ("generate None among texts", lambda m: m.llm.generate(["Q", None]), "prompts"),
    ("generate ''", lambda m: m.llm.generate(""), "prompts"),
    ("generate float ids", lambda m: m.llm.generate([1.7, 5.2]), "prompts"),
    ("generate bool ids", lambda m: m.llm.generate([True, False]), "prompts"),
    ("generate string ids", lambda m: m.llm.generate([["1", "2"]]), "prompts"),
    ("generate id outside the vocabulary", lambda m: m.llm.generate([[1, 2], [3, 10**6]]),
     "prompts"),
    ("generate negative id", lambda m: m.llm.generate([[1, -2]]), "prompts"),
    ("generate [[]]", lambda m: m.llm.generate([[]]), "prompts"),
    ("generate float array", lambda m: m.llm.generate(np.array([1.5, 2.5])), "prompts"),
    ("generate float tensor", lambda m: m.llm.generate(torch.tensor([1.0, 2.0])), "prompts"),
    ("generate bool tensor", lambda m: m.llm.generate(torch.tensor([True])), "prompts"),
    ("generate 0-d tensor", lambda m: m.llm.generate(torch.tensor(5)), "prompts"),
    ("generate 3-d tensor", lambda m: m.llm.generate(torch.ones(2, 2, 2, dtype=torch.long)),
     "prompts"),
    ("generate a dict", lambda m: m.llm.generate({"a": 1}), "prompts"),
    ("generate sampling_params=str", lambda m: m.llm.generate(PROBLEM, "greedy"),
     "sampling_params"),
    ("generate max_tokens past the pool", lambda m: m.llm.generate(PROBLEM, SP(max_tokens=10**6)),
     "max_tokens"),
    ("generate n above max_n", lambda m: m.llm.generate(PROBLEM, SP(n=2000)), "n"),
    ("generate use_tqdm=str", lambda m: m.llm.generate(PROBLEM, use_tqdm="no"), "use_tqdm"),
    ("generate continue_text 'Wait' on the toy", lambda m: m.llm.generate(
        PROBLEM, SP(min_thinking_tokens=4)), "continue_text"),
    ("add_request thinking_end outside the vocabulary", lambda m: m.llm.add_request(
        PROBLEM, SP(thinking_token_budget=4, thinking_end=[10**6])), "thinking_end"),
    ("add_request None", lambda m: m.llm.add_request(None), "prompt"),
    ("add_request ''", lambda m: m.llm.add_request(""), "prompt"),
    ("add_request params=int", lambda m: m.llm.add_request(PROBLEM, params=3), "params"),
    ("add_request n above max_n", lambda m: m.llm.add_request(PROBLEM, SP(n=1025)), "n"),
    ("add_request max_tokens past the pool", lambda m: m.llm.add_request(
        PROBLEM, SP(max_tokens=10**6)), "max_tokens"),
    ("add_request request_id=int", lambda m: m.llm.add_request(PROBLEM, request_id=7),
     "request_id"),
    ("add_request request_id=''", lambda m: m.llm.add_request(PROBLEM, request_id=""),
     "request_id"),
    ("abort unknown id", lambda m: m.llm.abort("no-such-request"), "request_id"),
    ("abort id=int", lambda m: m.llm.abort(5), "request_id"),
    ("abort id=list", lambda m: m.llm.abort(["x"]), "request_id"),
    ("encode float", lambda m: m.llm.encode(3.5), "prompts"),
    ("AsyncLLM of an LLM with options", lambda m: ttscale.AsyncLLM(m.llm, seed=1), "seed"),
]


def _bon(m, *args, **options):
    return ttscale.best_of_n(m.llm, *args, **m.search(**options))


def _co(m, *args, **options):
    return ttscale.compute_optimal(m.llm, *args, **m.search(**options))


SEARCHING = [
    ("n=0", lambda m: _bon(m, [PROBLEM], 0, verifier=m.prm), "n"),
    ("n=2.0", lambda m: _bon(m, [PROBLEM], 2.0), "n"),
    ("n above max_n", lambda m: _bon(m, [PROBLEM], 2000), "n"),
    ("n past the pool", lambda m: _bon(m, [PROBLEM], 1000, sampling=SP(max_tokens=500)), "n"),
    ("a PRM as the policy", lambda m: ttscale.best_of_n(m.prm, [PROBLEM], 2, verifier=m.prm,
                                                        **m.search()), "llm"),
    ("None as the policy", lambda m: ttscale.best_of_n(None, [PROBLEM], 2), "llm"),
    ("an LLM as the verifier", lambda m: _bon(m, [PROBLEM], 2, verifier=m.llm), "verifier"),
    ("SamplingParams as the verifier", lambda m: _bon(m, [PROBLEM], 2, SP()), "verifier"),
    ("select unknown", lambda m: _bon(m, [PROBLEM], 4, verifier=m.prm, select="nope"), "select"),
    ("select=best without a verifier", lambda m: _bon(m, [PROBLEM], 4, select="best"), "select"),
    ("agg unknown", lambda m: _bon(m, [PROBLEM], 4, verifier=m.prm, agg="nope"), "agg"),
    ("seed<0", lambda m: _bon(m, [PROBLEM], 4, verifier=m.prm, seed=-1), "seed"),
    ("seed=True", lambda m: _bon(m, [PROBLEM], 4, seed=True), "seed"),
    ("problems=str", lambda m: _bon(m, PROBLEM, 4, verifier=m.prm), "problems"),
    ("problems of ints", lambda m: _bon(m, [1, 2], 4), "problems"),
    ("a blank problem", lambda m: _bon(m, [PROBLEM, " "], 4), "problems"),
    ("references=str", lambda m: _bon(m, [PROBLEM], 2, references="65"), "references"),
    ("references of ints", lambda m: _bon(m, [PROBLEM], 2, references=[65]), "references"),
    ("references of another length", lambda m: _bon(m, [PROBLEM], 2, references=["1", "2"]),
     "references"),
    ("the rule verifier without references", lambda m: _bon(
        m, [PROBLEM], 2, verifier=ttscale.RuleVerifier()), "references"),
    ("system_prompt=int", lambda m: _bon(m, [PROBLEM], 2, system_prompt=5), "system_prompt"),
    ("prompt_fn=int", lambda m: _bon(m, [PROBLEM], 2, prompt_fn=5), "prompt_fn"),
    ("prompt_fn gives an int", lambda m: _bon(m, [PROBLEM], 2, prompt_fn=lambda p: 5),
     "prompt_fn"),
    ("prompt_fn gives float ids", lambda m: _bon(m, [PROBLEM], 2, prompt_fn=lambda p: [1.5]),
     "prompt_fn"),
    ("prompt_fn gives an id outside the vocabulary", lambda m: _bon(
        m, [PROBLEM], 2, prompt_fn=lambda p: [10**6]), "prompt_fn"),
    ("prompt_fn gives ''", lambda m: _bon(m, [PROBLEM], 2, prompt_fn=lambda p: ""), "prompt_fn"),
    ("step_delimiter=''", lambda m: _bon(m, [PROBLEM], 2, step_delimiter=""), "step_delimiter"),
    ("sampling=str", lambda m: _bon(m, [PROBLEM], 2, sampling="greedy"), "sampling"),
    ("sampling with stop strings", lambda m: _bon(m, [PROBLEM], 2, sampling=SP(stop="x")),
     "sampling"),
    ("extract=str", lambda m: _bon(m, [PROBLEM], 2, extract="x"), "extract"),
    ("progress=str", lambda m: _bon(m, [PROBLEM], 2, progress="no"), "progress"),
    ("problem_ids of another length", lambda m: _bon(m, [PROBLEM], 4, problem_ids=[1, 2]),
     "problem_ids"),
    ("problem_ids repeated", lambda m: _bon(m, [PROBLEM, PROBLEM], 4, problem_ids=[3, 3]),
     "problem_ids"),
    ("problem_ids<0", lambda m: _bon(m, [PROBLEM], 4, problem_ids=[-1]), "problem_ids"),
    ("problem_ids=str", lambda m: _bon(m, [PROBLEM], 4, problem_ids="3"), "problem_ids"),
    ("beam_width not dividing n", lambda m: ttscale.beam_search(
        m.llm, [PROBLEM], 6, verifier=m.prm, beam_width=4, **m.search()), "beam_width"),
    ("beam_width=True", lambda m: ttscale.beam_search(
        m.llm, [PROBLEM], 4, verifier=m.prm, beam_width=True, **m.search()), "beam_width"),
    ("max_iterations=0", lambda m: ttscale.beam_search(
        m.llm, [PROBLEM], 4, verifier=m.prm, max_iterations=0, **m.search()), "max_iterations"),
    ("beam search without a verifier", lambda m: ttscale.beam_search(
        m.llm, [PROBLEM], 8, verifier=None, **m.search()), "verifier"),
    ("dvts without a verifier", lambda m: ttscale.dvts(m.llm, [PROBLEM], 4, **m.search()),
     "verifier"),
    ("lookahead<0", lambda m: ttscale.lookahead(
        m.llm, [PROBLEM], 4, verifier=m.prm, lookahead=-1, **m.search()), "lookahead"),
    ("reject_fraction=1", lambda m: ttscale.rejection_best_of_n(
        m.llm, [PROBLEM], 4, verifier=m.prm, reject_fraction=1.0, **m.search()),
     "reject_fraction"),
    ("reject_fraction=str", lambda m: ttscale.rejection_best_of_n(
        m.llm, [PROBLEM], 4, verifier=m.prm, reject_fraction="0.5", **m.search()),
     "reject_fraction"),
    ("check_every=0", lambda m: ttscale.rejection_best_of_n(
        m.llm, [PROBLEM], 4, verifier=m.prm, check_every=0, **m.search()), "check_every"),
    ("sequential not dividing n", lambda m: ttscale.revisions(
        m.llm, [PROBLEM], 4, 3, verifier=m.prm, **m.search()), "sequential"),
    ("revisions window=0", lambda m: ttscale.revisions(
        m.llm, [PROBLEM], 4, 2, window=0, **m.search()), "window"),
    ("revision_fn=int", lambda m: ttscale.revisions(
        m.llm, [PROBLEM], 4, 2, revision_fn=3, **m.search()), "revision_fn"),
    ("revision_fn gives a float", lambda m: ttscale.revisions(
        m.llm, [PROBLEM], 4, 2, revision_fn=lambda i: 3.5, **m.search()), "revision_fn"),
    ("revisions n above max_n", lambda m: ttscale.revisions(
        m.llm, [PROBLEM], 4096, 2, **m.search()), "n"),
    ("hierarchical without a verifier", lambda m: ttscale.revisions(
        m.llm, [PROBLEM], 4, 2, select="hierarchical", **m.search()), "select"),
    ("rsa aggregation_size above n", lambda m: ttscale.rsa(
        m.llm, [PROBLEM], 2, aggregation_size=3, **m.search()), "aggregation_size"),
    ("rsa aggregation_rounds<0", lambda m: ttscale.rsa(
        m.llm, [PROBLEM], 2, aggregation_rounds=-1, **m.search()), "aggregation_rounds"),
    ("rsa aggregate_fn gives a float", lambda m: ttscale.rsa(
        m.llm, [PROBLEM], 2, aggregation_size=1, aggregation_rounds=1,
        aggregate_fn=lambda problem, attempts: 0.5,
        sampling=SP(max_tokens=4), **m.search()), "aggregate_fn"),
    ("particle_filtering resample_temperature=0", lambda m: ttscale.particle_filtering(
        m.llm, [PROBLEM], 4, verifier=m.prm, resample_temperature=0, **m.search()),
     "resample_temperature"),
    ("rebase balance_temperature<0", lambda m: ttscale.rebase(
        m.llm, [PROBLEM], 4, verifier=m.prm, balance_temperature=-1, **m.search()),
     "balance_temperature"),
    ("deepconf confidence_window=0", lambda m: ttscale.deepconf(
        m.llm, [PROBLEM], 4, confidence_window=0, **m.search()), "confidence_window"),
    ("deepconf confidence_top_k=21", lambda m: ttscale.deepconf(
        m.llm, [PROBLEM], 4, confidence_top_k=21, **m.search()), "confidence_top_k"),
    ("deepconf confidence_score unknown", lambda m: ttscale.deepconf(
        m.llm, [PROBLEM], 4, confidence_score="median", **m.search()), "confidence_score"),
    ("deepconf keep_fraction=0", lambda m: ttscale.deepconf(
        m.llm, [PROBLEM], 4, keep_fraction=0.0, **m.search()), "keep_fraction"),
    ("deepconf keep_fraction above 1", lambda m: ttscale.deepconf(
        m.llm, [PROBLEM], 4, keep_fraction=1.5, **m.search()), "keep_fraction"),
    ("deepconf n_init above n", lambda m: ttscale.deepconf(
        m.llm, [PROBLEM], 4, n_init=5, **m.search()), "n_init"),
    ("deepconf n_init a bool", lambda m: ttscale.deepconf(
        m.llm, [PROBLEM], 4, n_init=True, **m.search()), "n_init"),
    ("deepconf consensus=0", lambda m: ttscale.deepconf(
        m.llm, [PROBLEM], 4, consensus=0, **m.search()), "consensus"),
    ("deepconf confidence_tail=0", lambda m: ttscale.deepconf(
        m.llm, [PROBLEM], 4, confidence_tail=0, **m.search()), "confidence_tail"),
    ("mcts branching=0", lambda m: ttscale.mcts(
        m.llm, [PROBLEM], 4, verifier=m.prm, branching=0, **m.search()), "branching"),
    ("mcts widening<0", lambda m: ttscale.mcts(
        m.llm, [PROBLEM], 4, verifier=m.prm, widening=-0.5, **m.search()), "widening"),
    ("mcts rollouts<0", lambda m: ttscale.mcts(
        m.llm, [PROBLEM], 4, verifier=m.prm, rollouts=-1, **m.search()), "rollouts"),
    ("mcts n above max_n", lambda m: ttscale.mcts(
        m.llm, [PROBLEM], 5000, verifier=m.prm, **m.search()), "n"),
    ("budget_forcing without a budget", lambda m: ttscale.budget_forcing(
        m.llm, [PROBLEM], 2, **m.search()), "budget"),
    ("budget_forcing budget<0", lambda m: ttscale.budget_forcing(
        m.llm, [PROBLEM], 2, budget=-1, **m.search()), "budget"),
    ("budget_forcing min_thinking_tokens above the budget", lambda m: ttscale.budget_forcing(
        m.llm, [PROBLEM], 2, budget=8, min_thinking_tokens=9, **m.search()),
     "min_thinking_tokens"),
    ("budget_forcing continue_text the toy cannot spell", lambda m: ttscale.budget_forcing(
        m.llm, [PROBLEM], 2, budget=8, continue_text="Wait", **m.search()), "continue_text"),
    ("budget_forcing max_extensions without a minimum", lambda m: ttscale.budget_forcing(
        m.llm, [PROBLEM], 2, budget=8, min_thinking_tokens=0, max_extensions=1, **m.search()),
     "max_extensions"),
    ("an unknown strategy keyword", lambda m: _bon(m, [PROBLEM], 4, bogus=1), "bogus"),
    ("n missing", lambda m: ttscale.best_of_n(m.llm, [PROBLEM], **m.search()), "n"),
    ("on_progress=int", lambda m: _bon(m, [PROBLEM], 2, on_progress=3), "on_progress"),
    ("compute_optimal budget above max_n", lambda m: _co(m, [PROBLEM], ["65"], [PROBLEM], 4096,
                                                         m.prm), "budget"),
    ("compute_optimal pilot_n=True", lambda m: _co(m, [PROBLEM], ["65"], [PROBLEM], 4, m.prm,
                                                   pilot_n=True), "pilot_n"),
    ("compute_optimal strategies=str", lambda m: _co(m, [PROBLEM], ["65"], [PROBLEM], 4, m.prm,
                                                     strategies="best_of_n"), "strategies"),
    ("compute_optimal table=str", lambda m: _co(m, [PROBLEM], ["65"], [PROBLEM], 4, m.prm,
                                                table="x"), "table"),
    ("compute_optimal unknown keyword", lambda m: _co(m, [PROBLEM], ["65"], [PROBLEM], 4, m.prm,
                                                      bogus=1), "bogus"),
    ("compute_optimal calibration_problems=str", lambda m: _co(m, PROBLEM, ["65"], [PROBLEM], 4,
                                                               m.prm), "calibration_problems"),
    ("compute_optimal calibration_references of ints", lambda m: _co(
        m, [PROBLEM], [65], [PROBLEM], 4, m.prm), "calibration_references"),
    ("compute_optimal without a verifier", lambda m: _co(m, [PROBLEM], ["65"], [PROBLEM], 4,
                                                         None), "verifier"),
]

VERIFYING = [
    ("score_text problem=None", lambda m: m.prm.score_text(None, "1+1=2"), "problem"),
    ("score_text solution=int", lambda m: m.prm.score_text(PROBLEM, 5), "solution"),
    ("score_text a blank problem", lambda m: m.prm.score_text(" ", "1+1=2"), "problem"),
    ("score_text lists of other lengths", lambda m: m.prm.score_text([PROBLEM], ["a", "b"]),
     "solution"),
    ("score_text a list with an int", lambda m: m.prm.score_text([PROBLEM, 3], ["a", "b"]),
     "problem"),
    ("score_solution steps=str", lambda m: m.prm.score_solution(PROBLEM, "1+1=2"), "steps"),
    ("score_solution steps of ints", lambda m: m.prm.score_solution(PROBLEM, [1, 2]), "steps"),
    ("start problems=str", lambda m: m.prm.start(PROBLEM), "problems"),
    ("start a blank problem", lambda m: m.prm.start([""]), "problems"),
    ("rule start without references", lambda m: ttscale.RuleVerifier().start([PROBLEM]),
     "references"),
    ("fork from parent -1", lambda m: _forked(m.prm, [-1]), "parents"),
    ("fork from a parent past the paths", lambda m: _forked(m.prm, [1]), "parents"),
    ("fork from parent True", lambda m: _forked(m.prm, [True]), "parents"),
    ("rule fork from parent -1", lambda m: _forked(ttscale.RuleVerifier(), [-1]), "parents"),
    ("score final=str", lambda m: _scored(m.prm, ["1+1=2"], "y"), "final"),
    ("score final of ints", lambda m: _scored(m.prm, ["1+1=2"], [1]), "final"),
    ("score steps of another length", lambda m: _scored(m.prm, ["a", "b"], [True]), "steps"),
    ("rule score final=str", lambda m: _scored(ttscale.RuleVerifier(), ["x"], "y"), "final"),
    ("score paths of text", lambda m: m.prm.score(["x"], ["1+1=2"], [True]), "paths"),
    ("free paths of text", lambda m: m.prm.free(["x"]), "paths"),
]


def _forked(verifier, parents):
    (root,) = verifier.start([PROBLEM], ["65"])
    try:
        return verifier.fork([root], parents)
    finally:
        verifier.free([root])


def _scored(verifier, steps, final):
    (root,) = verifier.start([PROBLEM], ["65"])
    try:
        return verifier.score([root], steps, final)
    finally:
        verifier.free([root])

EVALUATING = [
    ("read_problems None", lambda m: evaluate.read_problems(None), "path"),
    ("read_problems missing", lambda m: evaluate.read_problems(m.folder / "none.jsonl"), "path"),
    ("read_problems a folder", lambda m: evaluate.read_problems(m.folder), "path"),
    ("read_problems no problems", lambda m: evaluate.read_problems(
        _written(m.folder / "empty.jsonl", "\n")), "data"),
    ("read_problems bad JSON", lambda m: evaluate.read_problems(
        _written(m.folder / "bad.jsonl", "{nope\n")), "data"),
    ("run_evaluation search=None", lambda m: evaluate.run_evaluation(None, m.problems, m.out),
     "search"),
    ("run_evaluation problems=str", lambda m: evaluate.run_evaluation(no_search, "abc", m.out),
     "problems"),
    ("run_evaluation out a folder", lambda m: evaluate.run_evaluation(no_search, m.problems,
                                                                      m.folder), "out"),
    ("run_evaluation out=None", lambda m: evaluate.run_evaluation(no_search, m.problems, None),
     "out"),
    ("run_evaluation batch_size=0", lambda m: evaluate.run_evaluation(
        no_search, m.problems, m.out, batch_size=0), "batch_size"),
    ("run_evaluation batch_size=True", lambda m: evaluate.run_evaluation(
        no_search, m.problems, m.out, batch_size=True), "batch_size"),
    ("run_evaluation settings=list", lambda m: evaluate.run_evaluation(
        no_search, m.problems, m.out, settings=[1]), "settings"),
    ("run_evaluation settings not JSON", lambda m: evaluate.run_evaluation(
        no_search, m.problems, m.out, settings={"a": object()}), "settings"),
    ("run_evaluation all_problems lacks problems", lambda m: evaluate.run_evaluation(
        no_search, m.problems, m.out, all_problems=[]), "all_problems"),
    ("run_evaluation save_candidates=str", lambda m: evaluate.run_evaluation(
        no_search, m.problems, m.out, save_candidates="yes"), "save_candidates"),
    ("run_evaluation setup=int", lambda m: evaluate.run_evaluation(
        no_search, m.problems, m.out, setup=3), "setup"),
    ("summarize None", lambda m: evaluate.summarize(None), "records"),
    ("summarize not result lines", lambda m: evaluate.summarize([{"a": 1}]), "records"),
    ("format_summary a dict", lambda m: evaluate.format_summary({}), "summary"),
    ("result_record result=None", lambda m: evaluate.result_record(m.problems[0], None, 1.0, {}),
     "result"),
]

ROWS = [(f"{group}: {name}", call, param)
        for group, rows in (("sampling", SAMPLING), ("construction", CONSTRUCTION),
                            ("generating", GENERATING), ("searching", SEARCHING),
                            ("verifying", VERIFYING), ("evaluating", EVALUATING))
        for name, call, param in rows]


def _written(path, text):
    path.write_text(text)
    return path


def check(call, param):
    with pytest.raises(TTScaleError) as caught:
        call()
    error = caught.value
    assert isinstance(error, InvalidArgument) and isinstance(error, ValueError)
    assert error.param == param, (error.param, str(error))
    assert param in str(error), str(error)


@pytest.mark.parametrize("call, param", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_named(models, call, param):
    check(lambda: call(models), param)


def test_the_table_covers_every_entry_point():
    assert len(ROWS) >= 120
    assert len({name for name, _, _ in ROWS}) == len(ROWS)


def test_the_engine_keeps_serving_after_bad_inputs(models):
    for _, call, _ in GENERATING + SEARCHING:
        with pytest.raises(TTScaleError):
            call(models)
    llm = models.llm
    (out,) = llm.generate(PROBLEM, SP(temperature=0, max_tokens=60), use_tqdm=False)
    assert out.outputs[0].text == "88-5=83\n83-18=65\nanswer: 65\n"
    assert not llm.has_unfinished_requests()
    assert llm.engine.pool.refresh() == llm.engine.pool.num_blocks


def test_numpy_integers_and_arrays_are_taken(models):
    """What is accepted on purpose: numpy integers for counts and seeds, integer arrays and
    tensors for token ids; they are used as the Python ints they equal."""
    params = SP(n=np.int64(2), max_tokens=np.int32(4), seed=np.uint64(7), temperature=np.float32(1))
    assert (type(params.n), type(params.seed), type(params.temperature)) == (int, int, float)
    ids = models.llm.encode(PROBLEM)
    by_list = models.llm.generate([ids], params, use_tqdm=False)
    by_array = models.llm.generate(np.array(ids), params, use_tqdm=False)
    by_tensor = models.llm.generate(torch.tensor([ids]), params, use_tqdm=False)
    by_text = models.llm.generate(np.str_(PROBLEM), params, use_tqdm=False)  # a str subclass
    texts = [[c.text for c in out[0].outputs] for out in (by_list, by_array, by_tensor, by_text)]
    assert texts[0] == texts[1] == texts[2] == texts[3]
    results = ttscale.best_of_n(models.llm, [PROBLEM], np.int64(2), seed=np.int64(3),
                                problem_ids=np.array([5]), sampling=SP(max_tokens=8),
                                **models.search())
    assert len(results[0].candidates) == 2


def test_a_request_that_can_never_fit_is_refused_within_a_second(models):
    start = time.perf_counter()
    with pytest.raises(InvalidArgument) as caught:
        models.llm.generate([PROBLEM] * 64, SP(n=1024, max_tokens=10**6), use_tqdm=False)
    assert caught.value.param == "max_tokens"
    assert time.perf_counter() - start < 1.0


def test_a_request_larger_than_the_pool_runs_piecewise(one_thread):
    """Below max_n, n samples that do not fit the pool at once are admitted as room frees."""
    llm = ttscale.LLM(policy_dir(), device="cpu", kv_budget_bytes=1 << 20)  # 16 blocks
    params = SP(n=24, max_tokens=30, seed=1)
    (out,) = llm.generate(PROBLEM, params, use_tqdm=False)
    assert len(out.outputs) == 24 and all(c.finish_reason for c in out.outputs)
    assert llm.engine.pool.refresh() == llm.engine.pool.num_blocks


def test_score_text_takes_lists(models):
    """One solution per problem, scored together: the scores each gets alone."""
    solutions = ["88-5=83\n\n83-18=65\n\nanswer: 65", "88-5=83\n\nanswer: 83"]  # "\n\n" apart
    together = models.prm.score_text([PROBLEM, PROBLEM], solutions)
    alone = [models.prm.score_text(PROBLEM, s) for s in solutions]
    assert [len(s) for s in together] == [3, 2]
    for got, want in zip(together, alone, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("strategy", ["best_of_n", "beam_search"])
def test_a_verifier_that_raises_fails_its_search_only(models, strategy, monkeypatch):
    """The search fails with the verifier's error; every KV block it took (policy and PRM) goes
    back, and the next search gives what it gives on fresh engines."""
    llm, prm = models.llm, models.prm
    common = dict(verifier=prm, prompt_fn=lambda p: p, step_delimiter="\n", progress=False, seed=3,
                  sampling=SP(temperature=1.0, max_tokens=60))
    extra = {"beam_width": 2} if strategy == "beam_search" else {}
    search = getattr(ttscale, strategy)
    expected = [r.answer for r in search(llm, [PROBLEM, "Q: (12+7)*3\n"], 4, **common, **extra)]
    calls, score = [], prm.score_aggregate  # what searches call to score a step

    def flaky(paths, steps, final, state, agg):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the PRM's device fell over")
        return score(paths, steps, final, state, agg)

    monkeypatch.setattr(prm, "score_aggregate", flaky)
    with pytest.raises(RuntimeError, match="fell over"):
        search(llm, [PROBLEM, "Q: (12+7)*3\n"], 4, **common, **extra)
    monkeypatch.undo()
    assert llm.engine.pool.refresh() == llm.engine.pool.num_blocks
    assert prm.engine.pool.refresh() == prm.engine.pool.num_blocks
    assert [r.answer for r in search(llm, [PROBLEM, "Q: (12+7)*3\n"], 4, **common, **extra)] == expected
