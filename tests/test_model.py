"""Our transformer on the paged pool against transformers' models (the independent reference).

Tiny random-weight models of each family, fp32 on the CPU. Prefill logits match within 1e-4;
greedy continuations match token for token; a sequence forked from a shared prompt gets the
logits of prefilling prompt + suffix from scratch.
"""

from __future__ import annotations

import pytest
import torch
from paged import assert_close
from tiny_models import (
    VARIANTS,
    PagedDriver,
    Sequence,
    build_hf_model,
    edit_checkpoint,
    edit_config,
)
from ttscale import backends
from ttscale.model import AttentionBatch, KVCache, load_model, read_config

ATOL = 1e-4  # fp32 logits against transformers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread, restored


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, transformers model, directory) for each family and switch."""
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, build_hf_model(request.param, directory), directory


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Two paged paths that compute the same logits in a different order: fp32 rounding apart."""
    assert_close(actual, expected, torch.float32, "logits")


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


def test_prefill_logits_match_transformers(variant):
    name, hf_model, directory = variant
    model = load_model(directory, device="cpu", dtype="float32")
    ids = _prompt(29, seed=1)  # not a multiple of the block size
    _, logits = PagedDriver(model).add_prompt(ids)
    expected = _hf_logits(hf_model, ids)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() <= ATOL, name


def test_greedy_continuation_matches_transformers(variant):
    name, hf_model, directory = variant
    model = load_model(directory, device="cpu", dtype="float32")
    prompt = _prompt(13, seed=2)
    driver = PagedDriver(model)
    problem, logits = driver.add_prompt(prompt)
    seq = Sequence(problem)
    ours = [int(logits[-1].argmax())]
    for _ in range(31):
        ours.append(int(driver.decode([seq], [ours[-1]])[0].argmax()))

    theirs = []
    for _ in range(32):
        theirs.append(int(_hf_logits(hf_model, prompt + theirs)[-1].argmax()))
    assert ours == theirs, name


def test_fork_from_shared_prompt_equals_prefill_from_scratch(variant):
    name, _, directory = variant
    model = load_model(directory, device="cpu", dtype="float32")
    prompt = _prompt(19, seed=3)
    suffixes = [_prompt(n, seed=10 + n) for n in (1, 8, 13)]  # within, at and across block edges
    driver = PagedDriver(model)
    problem, _ = driver.add_prompt(prompt)
    forks = [Sequence(problem) for _ in suffixes]
    forked = driver.extend(forks, suffixes)
    next_tokens = [int(t) for t in _prompt(3, seed=4)]
    forked_next = driver.decode(forks, next_tokens)

    start = 0
    for suffix, token, row in zip(suffixes, next_tokens, forked_next, strict=True):
        scratch_problem, scratch = driver.add_prompt(prompt + suffix)
        alone = Sequence(scratch_problem)
        assert_same(forked[start : start + len(suffix)], scratch[len(prompt) :])
        assert_same(row, driver.decode([alone], [token])[0])
        start += len(suffix)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    build_hf_model("llama", directory)
    return directory


def test_batched_decode_of_two_problems_equals_each_alone(llama_dir):
    model = load_model(llama_dir, dtype="float32")
    driver = PagedDriver(model)
    p0, _ = driver.add_prompt(_prompt(11, seed=5))
    p1, _ = driver.add_prompt(_prompt(24, seed=6))
    batched = [Sequence(p1), Sequence(p0), Sequence(p1), Sequence(p0)]  # interleaved problems
    alone = [Sequence(s.problem) for s in batched]
    tokens = _prompt(4, seed=7)
    for _ in range(10):
        together = driver.decode(batched, tokens)
        apart = torch.cat([driver.decode([s], [t]) for s, t in zip(alone, tokens, strict=True)])
        assert_same(together, apart)
        tokens = together.argmax(-1).tolist()


def test_chunked_prompt_prefill_equals_one_shot(llama_dir):
    model = load_model(llama_dir, dtype="float32")
    driver = PagedDriver(model)
    ids = _prompt(30, seed=8)
    _, whole = driver.add_prompt(ids)
    _, chunked = driver.add_prompt(ids, chunk=7)
    assert_same(whole, chunked)


def _slots_written(kv, before) -> list[int]:
    """Per layer, how many pool slots (block, offset) differ from the snapshot ``before``."""
    return [int((k != old).any(-1).any(-1).sum()) for k, old in zip(kv.k, before, strict=True)]


def test_padded_decode_rows_change_nothing(llama_dir):
    """Rows with slot -1 (a CUDA graph's padding) neither write the pool nor move real rows."""
    model = load_model(llama_dir, dtype="float32")
    driver = PagedDriver(model)
    problem, _ = driver.add_prompt(_prompt(9, seed=9))
    before = [k.clone() for k in driver.kv.k]
    plain = driver.decode([Sequence(problem)], [5])
    assert _slots_written(driver.kv, before) == [1] * model.config.num_layers
    padded = driver.decode([Sequence(problem)], [5], padded_rows=3)
    assert _slots_written(driver.kv, before) == [2] * model.config.num_layers
    assert_same(padded, plain)


def test_rows_and_token_ids_select_from_the_full_output(llama_dir):
    model = load_model(llama_dir, dtype="float32")
    ids = _prompt(12, seed=10)
    _, full = PagedDriver(model).add_prompt(ids)
    rows = torch.tensor([11, 3])
    hidden = PagedDriver(model).prompt_hidden(ids, rows)
    assert hidden.shape == (2, model.config.hidden_size)
    assert_same(model.compute_logits(hidden), full[rows])
    picked = model.compute_logits(hidden, token_ids=torch.tensor([7, 3]))
    assert_same(picked, full[rows][:, [7, 3]])


ATTENTION_BACKENDS = [
    b
    for b in ("torch", "cpu", "triton")
    if b in backends.available("paged_prefill_attention", "cpu")
    and b in backends.available("cascade_decode_attention", "cpu")
]


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_every_attention_backend_runs_the_model_alike(llama_dir, backend):
    model = load_model(llama_dir, dtype="float32")
    results = []
    for chosen in (None, backend):
        driver = PagedDriver(model, backend=chosen)
        problem, prompt_logits = driver.add_prompt(_prompt(18, seed=19))
        seqs = [Sequence(problem), Sequence(problem)]
        step_logits = driver.decode(seqs, [3, 4])
        results.append(torch.cat([prompt_logits, step_logits]))
    assert_same(results[1], results[0])


def test_llama3_rope_scaling_changes_the_logits(tmp_path):
    """The llama3 variant's test would be vacuous if its scaling had no effect at these lengths."""
    build_hf_model("llama3_rope", tmp_path)
    scaled = load_model(tmp_path, dtype="float32")
    edit_config(
        tmp_path,
        lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    )
    plain = load_model(tmp_path, dtype="float32")
    ids = _prompt(29, seed=11)
    diff = (
        (PagedDriver(scaled).add_prompt(ids)[1] - PagedDriver(plain).add_prompt(ids)[1]).abs().max()
    )
    assert diff > 1e-2


@pytest.mark.parametrize("style", ["rope_theta_and_rope_scaling", "rope_scaling_with_type_key"])
def test_published_rope_config_style_loads_like_rope_parameters(tmp_path, style):
    hf_model = build_hf_model("llama3_rope", tmp_path)
    modern = read_config(tmp_path).rope

    def to_published(config):
        params = config.pop("rope_parameters")
        config["rope_theta"] = params.pop("rope_theta")
        if style == "rope_scaling_with_type_key":
            params["type"] = params.pop("rope_type")
        config["rope_scaling"] = params

    edit_config(tmp_path, to_published)
    assert read_config(tmp_path).rope == modern
    ids = _prompt(29, seed=12)
    logits = PagedDriver(load_model(tmp_path, dtype="float32")).add_prompt(ids)[1]
    assert (logits - _hf_logits(hf_model, ids)).abs().max() <= ATOL


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = build_hf_model("qwen2", tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(shards) > 1
    ids = _prompt(17, seed=13)
    logits = PagedDriver(load_model(tmp_path, dtype="float32")).add_prompt(ids)[1]
    assert (logits - _hf_logits(hf_model, ids)).abs().max() <= ATOL


def test_bfloat16_on_cpu_is_close_to_float32(llama_dir):
    ids = _prompt(21, seed=14)
    full = PagedDriver(load_model(llama_dir, dtype="float32")).add_prompt(ids)[1]
    half = PagedDriver(load_model(llama_dir, dtype="bf16")).add_prompt(ids)[1]
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() <= 0.1 * (1 + full.abs().max())


# ---------------------------------------------------------------------------------------------
# Reward heads: transformers has no class for these, so the head is built by hand on top of a
# Qwen2 base and compared with a plain torch computation on transformers' final hidden states.


def _hf_hidden(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model.model(torch.tensor([ids])).last_hidden_state[0]


def _reward_model(tmp_path, architecture: str, head: dict[str, torch.Tensor], keep_lm_head: bool):
    hf_model = build_hf_model("qwen2", tmp_path)

    def add_head(tensors):
        if not keep_lm_head:
            tensors.pop("lm_head.weight")
        return {**tensors, **head}

    edit_checkpoint(tmp_path, add_head)
    edit_config(tmp_path, lambda c: c.update(architectures=[architecture]))
    return hf_model, load_model(tmp_path, dtype="float32")


def test_two_class_prm_head_matches_torch(tmp_path):
    gen = torch.Generator().manual_seed(15)
    head = {
        "score.0.weight": torch.randn(64, 64, generator=gen) * 0.2,
        "score.0.bias": torch.randn(64, generator=gen),
        "score.2.weight": torch.randn(2, 64, generator=gen) * 0.2,
        "score.2.bias": torch.randn(2, generator=gen),
    }
    hf_model, model = _reward_model(
        tmp_path, "Qwen2ForProcessRewardModel", head, keep_lm_head=False
    )
    assert model.config.head == "two_class" and model.config.num_labels == 2
    ids = _prompt(23, seed=16)
    positions = torch.tensor([4, 15, 22])  # step tags
    hidden = _hf_hidden(hf_model, ids)[positions]
    expected = (
        torch.relu(hidden @ head["score.0.weight"].T + head["score.0.bias"])
        @ head["score.2.weight"].T
        + head["score.2.bias"]
    )

    scores = model.compute_scores(PagedDriver(model).prompt_hidden(ids, positions))
    assert scores.shape == (3, 2) and scores.dtype == torch.float32
    assert (scores - expected).abs().max() <= ATOL
    with pytest.raises(ValueError, match="no LM head"):
        model.compute_logits(hidden)


def test_value_head_prm_matches_torch(tmp_path):
    gen = torch.Generator().manual_seed(17)
    head = {
        "v_head.summary.weight": torch.randn(1, 64, generator=gen) * 0.2,
        "v_head.summary.bias": torch.randn(1, generator=gen),
    }
    # Skywork's checkpoint also holds its base model's lm_head: skipped, not an error.
    hf_model, model = _reward_model(tmp_path, "Qwen2ForPrmModel", head, keep_lm_head=True)
    assert model.config.head == "value"
    ids = _prompt(23, seed=18)
    positions = torch.tensor([0, 9, 22])
    hidden = _hf_hidden(hf_model, ids)[positions]
    expected = (hidden @ head["v_head.summary.weight"].T + head["v_head.summary.bias"]).squeeze(-1)

    values = model.compute_scores(PagedDriver(model).prompt_hidden(ids, positions))
    assert values.shape == (3,)
    assert (values - expected).abs().max() <= ATOL


# ---------------------------------------------------------------------------------------------
# The KV pool


def test_kv_cache_from_budget_fits_the_budget(llama_dir):
    config = read_config(llama_dir)
    per_block = 2 * config.num_layers * 16 * config.num_kv_heads * config.head_dim * 4
    cache = KVCache.from_budget(
        config, 10 * per_block + per_block - 1, dtype=torch.float32, device="cpu"
    )
    assert cache.num_blocks == 10 and cache.block_size == 16 and len(cache.k) == config.num_layers
    assert all(
        k.is_contiguous() and k.shape == (10, 16, config.num_kv_heads, config.head_dim)
        for k in cache.k
    )
    with pytest.raises(ValueError, match="budget_bytes: .* hold no KV block"):
        KVCache.from_budget(config, per_block - 1, dtype=torch.float32, device="cpu")


def test_forward_errors_name_the_argument(llama_dir):
    model = load_model(llama_dir, dtype="float32", max_positions=64)
    kv = KVCache.allocate(model.config, 8, dtype=torch.float32, device="cpu")
    batch = AttentionBatch("prefill", **_batch_args(2, 1), q_lens=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"input_ids: expected shape \[2\]"):
        model(torch.zeros(3, dtype=torch.long), batch, kv)
    with pytest.raises(ValueError, match="kv_cache: expected 2 layers, got 1"):
        model(torch.zeros(2, dtype=torch.long), batch, KVCache(kv.k[:1], kv.v[:1]))
    batch.positions = torch.tensor([63, 64])
    with pytest.raises(ValueError, match=r"positions: value 64 outside \[0, 64\)"):
        model(torch.zeros(2, dtype=torch.long), batch, kv)


def test_a_layer_cache_unlike_the_first_is_named(llama_dir):
    """The ops check their arguments at layer 0 only, so every layer's cache must match it."""
    model = load_model(llama_dir, dtype="float32")
    kv = KVCache.allocate(model.config, 8, dtype=torch.float32, device="cpu")
    batch = AttentionBatch("prefill", **_batch_args(2, 1), q_lens=torch.tensor([2]))
    odd = KVCache(kv.k[:1] + [kv.k[1][:4]], kv.v)
    with pytest.raises(ValueError, match=r"kv_cache: k\[1\] is \[4, 16, 2, 16\]"):
        model(torch.zeros(2, dtype=torch.long), batch, odd)
    odd = KVCache(kv.k, kv.v[:1] + [kv.v[1].double()])
    with pytest.raises(ValueError, match=r"kv_cache: v\[1\] .* torch.float64"):
        model(torch.zeros(2, dtype=torch.long), batch, odd)


def test_bad_block_tables_are_caught_at_the_first_layer(llama_dir):
    model = load_model(llama_dir, dtype="float32")
    kv = KVCache.allocate(model.config, 8, dtype=torch.float32, device="cpu")
    args = _batch_args(2, 1) | {"prompt_block_tables": torch.full((1, 4), 8)}
    batch = AttentionBatch("prefill", **args, q_lens=torch.tensor([2]))
    with pytest.raises(ValueError, match="prompt_block_tables: value 8"):
        model(torch.zeros(2, dtype=torch.long), batch, kv)


# ---------------------------------------------------------------------------------------------
# AttentionBatch


def _batch_args(tokens: int, seqs: int) -> dict:
    return dict(
        positions=torch.arange(tokens),
        slots=torch.arange(tokens),
        prompt_block_tables=torch.zeros(1, 4),
        prompt_lens=torch.tensor([tokens]),
        problem_ids=torch.zeros(seqs),
        suffix_block_tables=torch.zeros(seqs, 1),
        suffix_lens=torch.zeros(seqs),
    )


def test_attention_batch_converts_to_the_ops_dtypes_and_plans_decode_once():
    batch = AttentionBatch("decode", **_batch_args(3, 3))
    assert batch.positions.dtype == batch.slots.dtype == torch.int64
    assert batch.prompt_block_tables.dtype == batch.suffix_lens.dtype == torch.int32
    assert batch.plan is not None and batch.plan.problem_starts.tolist() == [0, 3]


def test_attention_batch_errors_name_the_argument():
    with pytest.raises(ValueError, match="mode: expected 'prefill' or 'decode', got 'verify'"):
        AttentionBatch("verify", **_batch_args(2, 1))
    with pytest.raises(ValueError, match="q_lens: a prefill step needs"):
        AttentionBatch("prefill", **_batch_args(2, 1))
    with pytest.raises(ValueError, match="positions: a decode step has one new token per sequence"):
        AttentionBatch("decode", **_batch_args(2, 1))
    with pytest.raises(ValueError, match=r"slots: expected shape \[2\]"):
        AttentionBatch("prefill", **{**_batch_args(2, 1), "slots": torch.arange(3)})
