"""Sequential revisions: ours (a chain's context grows in place in the KV cache) against the
naive way, which resubmits the whole revision context as a new request for every attempt.

Both run the same work on the same engine: ``problems`` × ``chains`` chains of ``sequential``
attempts of exactly ``ATTEMPT_TOKENS`` tokens (``ignore_eos``, so both decode the same number of
tokens), the same revision format (:mod:`ttscale.search.revisions`) and window, no verifier.
They differ only in what they prefill: ours the prompt once per problem, then each revision's
separator (plus, past the window, the rebuilt context); the naive one every attempt's whole
context. The table gives the tokens each prefilled, the median wall time of a whole run, and
the ratios. The policy is a random Llama over the toy tokenizer (about 6M parameters on the CPU,
about 150M on a GPU): its text is noise, which does not matter for the cost.

Run: ``pytest bench/bench_revisions.py --benchmark-enable -s``. ``TTSCALE_BENCH_DEVICES`` picks
the devices (default ``cpu``, plus ``cuda`` when available); ``TTSCALE_BENCH_TINY=1`` runs a tiny
model and workload, to check the benchmark code itself.
"""

from __future__ import annotations

import pytest
import torch
import ttscale
from settings import DEVICES, TINY, TINY_DIMS
from ttscale.search.prompts import build_prompt
from ttscale.search.revisions import revision_context_ids, separator_ids
from ttscale.toy.task import problems as toy_problems

ATTEMPT_TOKENS = 8 if TINY else 64
# (hidden, intermediate, layers, heads, kv heads) of the random policy, per device; its
# vocabulary is the toy tokenizer's.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")
TINY_SHAPE = tuple(TINY_DIMS[name] for name in SHAPE_FIELDS)
MODELS = {
    "cpu": TINY_SHAPE if TINY else (256, 1024, 6, 8, 4),
    "cuda": TINY_SHAPE if TINY else (1024, 4096, 12, 16, 8),
}
# (problems, chains per problem, attempts per chain, window), per device.
WORKLOADS = {
    "cpu": [(2, 2, 2, 1)] if TINY else [(4, 2, 4, 3), (4, 2, 8, 8), (4, 2, 8, 3)],
    "cuda": [(2, 2, 2, 1)] if TINY else [(16, 4, 4, 3), (16, 4, 8, 8), (16, 4, 8, 3)],
}
IMPLS = ("ours", "naive")
PARAMS = [
    pytest.param(device, *workload, impl, id=f"{device}-{'-'.join(map(str, workload))}-{impl}")
    for device in DEVICES
    for workload in WORKLOADS[device]
    for impl in IMPLS
]


def save_policy(directory, shape: tuple[int, ...]):
    """A random Llama of ``shape`` (``SHAPE_FIELDS``) over the toy tokenizer, saved in
    ``directory``; returns its parameter count."""
    import transformers
    from ttscale.toy.tokenizer import build_tokenizer, save_tokenizer

    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(
        **dict(zip(SHAPE_FIELDS, shape, strict=True)),
        vocab_size=tokenizer.get_vocab_size(),
        max_position_embeddings=2048,
        eos_token_id=tokenizer.token_to_id("</s>"),
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return sum(p.numel() for p in model.parameters())


_POLICIES: dict[str, tuple[ttscale.LLM, int]] = {}


# A decode step is many small ops, each of which would wait for torch's second thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def policy(tmp_path_factory):
    def get(device: str) -> tuple[ttscale.LLM, int]:
        if device not in _POLICIES:
            directory = tmp_path_factory.mktemp(f"policy-{device}")
            params = save_policy(directory, MODELS[device])
            dtype = torch.float32 if device == "cpu" else torch.bfloat16
            llm = ttscale.LLM(directory, device=device, dtype=dtype, kv_budget_bytes=256 << 20)
            _POLICIES[device] = (llm, params)
        return _POLICIES[device]

    return get


def ours(llm, problems, chains, sequential, window, sampling):
    return ttscale.revisions(
        llm,
        problems,
        chains * sequential,
        sequential,
        None,
        sampling,
        window=window,
        step_delimiter="\n",
        extract=lambda text: None,
        equal=lambda a, b: a == b,
        progress=False,
    )


def naive(llm, problems, chains, sequential, window, sampling):
    """Revisions as a generic engine runs them: every attempt is a new request whose prompt is
    its whole revision context, prefilled from scratch (all chains' requests batched)."""
    engine, tokenizer = llm.engine, llm.tokenizer
    prompts = [build_prompt(tokenizer, problem) for problem in problems]
    separators = separator_ids(tokenizer, None, sequential - 1)
    chain_prompts = [prompt for prompt in prompts for _ in range(chains)]
    attempts: list[list[list[int]]] = [[] for _ in chain_prompts]
    eos = tokenizer.eos_token_id
    for k in range(sequential):
        shown = range(max(0, k - window), k)
        contexts = [
            revision_context_ids(prompt, [chain[i] for i in shown], [separators[i] for i in shown])
            for prompt, chain in zip(chain_prompts, attempts, strict=True)
        ]
        requests = engine.add_many(contexts)
        seqs = [engine.fork(request, 1)[0] for request in requests]
        engine.decode(seqs, sampling, stop=[])
        for chain, seq in zip(attempts, seqs, strict=True):
            ids = seq.output_ids
            chain.append(ids[:-1] if ids and ids[-1] == eos else ids)
        engine.free(seqs)
        for request in requests:
            engine.free_prompt(request)
    return attempts


@pytest.mark.parametrize("device,problems,chains,sequential,window,impl", PARAMS)
def test_revisions(
    device, problems, chains, sequential, window, impl, policy, measure, machine, tables
):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    llm, params = policy(device)
    rates = machine(device)
    dtype = "float32" if device == "cpu" else "bfloat16"
    table = f"revisions vs resubmitting the chain ({device}, {dtype})"
    tables.note(
        table,
        f"random Llama, {params / 1e6:.1f}M parameters, toy tokenizer; attempts of "
        f"{ATTEMPT_TOKENS} tokens (ignore_eos); no verifier; {rates.name}",
    )
    tables.note(
        table, "times: median wall time of a whole run; prefill: tokens the engine prefilled"
    )
    label = f"{problems} problems × {chains} chains × {sequential} attempts, window {window}"
    tables.declare(
        table,
        [
            "workload",
            "generated",
            "prefilled ours",
            "prefilled naive",
            "prefill naive ÷ ours",
            "ours s",
            "naive s",
            "naive ÷ ours",
        ],
    )
    sampling = ttscale.SamplingParams(
        temperature=1.0, max_tokens=ATTEMPT_TOKENS, ignore_eos=True, seed=0
    )
    run = {"ours": ours, "naive": naive}[impl]
    texts = [problem.prompt for problem in toy_problems("heldout", problems)]
    args = (llm, texts, chains, sequential, window)
    engine = llm.engine
    prefilled, generated = engine.prefilled_tokens, engine.generated_tokens
    run(*args, sampling)
    prefilled, generated = engine.prefilled_tokens - prefilled, engine.generated_tokens - generated
    assert generated == problems * chains * sequential * ATTEMPT_TOKENS
    timing = measure(lambda: run(*args, sampling), device, budget_s=5.0, min_rounds=3)
    data = tables.add(
        table,
        label,
        {
            "workload": label,
            "generated": generated,
            f"prefilled {impl}": prefilled,
            f"{impl} s": timing.seconds,
        },
        {f"{impl}_prefilled": prefilled, f"{impl}_s": timing.seconds, "generated": generated},
    )
    if "ours_s" in data and "naive_s" in data:
        tables.add(
            table,
            label,
            {
                "prefill naive ÷ ours": f"{data['naive_prefilled'] / data['ours_prefilled']:.1f}x",
                "naive ÷ ours": f"{data['naive_s'] / data['ours_s']:.2f}x",
            },
        )
    print(f"\n{table} | {label} | {impl}: prefilled {prefilled}, {timing.seconds:.3f} s")
