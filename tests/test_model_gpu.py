"""Our transformer on a GPU in bf16 against transformers' model on the same GPU in bf16.

Tiny random-weight models of each family, with the default GPU ops (the CUDA decode kernel) and
with Triton throughout: prefill logits within bf16 tolerance of transformers' and of the fp32
result, and greedy decoding token for token for 16 tokens (a divergence is accepted only where
transformers' own top two logits are within bf16 rounding of each other, a tie no
implementation decides reliably). The whole engine too, with CUDA graphs and without.
"""

from __future__ import annotations

import copy

import pytest
import torch
from paged import missing_feature
from tiny_models import VARIANTS, PagedDriver, Sequence, build_hf_model

from ttscale.model import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# None: each op's default on a GPU (the CUDA decode kernel, Triton for the ops that have no CUDA
# kernel, prefill among them); "triton": every op through Triton. ("cuda" alone cannot run a
# model: paged prefill has no CUDA kernel.)
GPU_BACKENDS = [None, "triton"]
BF16_REL = 3e-2  # ‖ours − theirs‖ / ‖theirs‖ between two bf16 runs (8 bits of mantissa each)
TIE = 2e-2  # top-two gap, relative to the logits' scale, under which argmax is a coin toss in bf16


def _backend_or_skip(backend: str | None) -> None:
    if backend is None:
        return
    if (why := missing_feature(backend, "cuda")) is not None:
        pytest.skip(why)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = build_hf_model(request.param, directory)
    return request.param, hf_model, copy.deepcopy(hf_model).to("cuda", torch.bfloat16), directory


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits(hf_model, ids: list[int]) -> torch.Tensor:
    device = next(hf_model.parameters()).device
    with torch.no_grad():
        return hf_model(torch.tensor([ids], device=device)).logits[0].float().cpu()


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(actual).any()
    return float((actual - expected).norm() / expected.norm())


def _their_greedy_agrees(hf_bf16, prompt: list[int], ours: list[int], name: str) -> None:
    """Each of our tokens is transformers' argmax after our prefix, or within a bf16 tie of it.

    transformers runs on our prefix at every step, so after a tie (where greedy continuations
    would part) every later token is still compared, on the same context."""
    ties = 0
    for step, token in enumerate(ours):
        row = _logits(hf_bf16, prompt + ours[:step])[-1]
        if int(row.argmax()) != token:
            gap = float(row.max() - row[token]) / float(row.abs().max())
            assert gap <= TIE, f"{name}: token {step}: ours {token}, theirs {int(row.argmax())}, gap {gap:.3g}"
            ties += 1
    assert ties <= len(ours) // 4, f"{name}: {ties} of {len(ours)} tokens differ within a tie"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bf16_prefill_logits_match_transformers(variant, backend):
    _backend_or_skip(backend)
    name, hf_fp32, hf_bf16, directory = variant
    model = load_model(directory, device="cuda", dtype="bfloat16")
    ids = _prompt(29, seed=1)
    _, ours = PagedDriver(model, backend=backend).add_prompt(ids)
    ours, exact = ours.float().cpu(), _logits(hf_fp32, ids)
    theirs = _logits(hf_bf16, ids)
    # As close to the fp32 result as transformers' own bf16 run is (bf16 rounds at other
    # points in each), and near transformers' bf16 logits.
    ours_error, their_error = _rel(ours, exact), _rel(theirs, exact)
    assert ours_error <= 2 * their_error + 2e-3, f"{name}: {ours_error:.4f} vs {their_error:.4f}"
    assert _rel(ours, theirs) <= BF16_REL, name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bf16_greedy_continuation_matches_transformers(variant, backend):
    _backend_or_skip(backend)
    name, _, hf_bf16, directory = variant
    model = load_model(directory, device="cuda", dtype="bfloat16")
    prompt = _prompt(13, seed=2)
    driver = PagedDriver(model, backend=backend)
    problem, logits = driver.add_prompt(prompt)
    seq = Sequence(problem)
    ours = [int(logits[-1].argmax())]
    for _ in range(15):
        ours.append(int(driver.decode([seq], [ours[-1]])[0].argmax()))
    _their_greedy_agrees(hf_bf16, prompt, ours, name)


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_engine_greedy_matches_transformers(variant, backend, graphs):
    """The whole engine (prefill, windows of decode steps, replayed or not) in bf16."""
    from ttscale.llm import LLM
    from ttscale.sampling_params import SamplingParams

    _backend_or_skip(backend)
    name, _, hf_bf16, directory = variant
    llm = LLM(directory, device="cuda", dtype="bfloat16", kv_budget_bytes=64 << 20,
              backend=backend, cuda_graphs=graphs)
    prompts = [_prompt(13, seed=2), _prompt(21, seed=5)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(out.outputs[0].token_ids) == 16
        _their_greedy_agrees(hf_bf16, prompt, list(out.outputs[0].token_ids), name)
    assert (llm.engine.runner.graphs is not None) == graphs


def test_graph_replay_samples_like_eager_steps(tmp_path):
    """Seeded sampling through captured steps (padded batches, several problems, windows cut by
    stops) draws the tokens eager steps draw, in fp32 where both compute the same logits."""
    from ttscale.llm import LLM
    from ttscale.sampling_params import SamplingParams

    directory = tmp_path / "llama"
    build_hf_model("llama", directory)
    prompts = [_prompt(n, seed=n) for n in (5, 17, 30)]
    params = SamplingParams(n=5, temperature=1.0, top_p=0.9, max_tokens=40, seed=3, logprobs=2)
    results = {}
    for graphs in (True, False):
        llm = LLM(directory, device="cuda", dtype="float32", kv_budget_bytes=64 << 20,
                  cuda_graphs=graphs)
        results[graphs] = llm.generate(prompts, params, use_tqdm=False)
        if graphs:
            captured = llm.engine.runner.graphs.captures
            assert captured > 0
            again = llm.generate(prompts, params, use_tqdm=False)
            assert llm.engine.runner.graphs.captures == captured, "a repeated call recaptured"
            assert [[c.token_ids for c in o.outputs] for o in again] == \
                [[c.token_ids for c in o.outputs] for o in results[True]]
    for replayed, eager in zip(results[True], results[False], strict=True):
        for a, b in zip(replayed.outputs, eager.outputs, strict=True):
            assert a.token_ids == b.token_ids
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)
