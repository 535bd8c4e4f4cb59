"""The process's KV budget per device: engines lease explicit shares, never more than all of it.

The free memory is faked (a CPU "device" with a stated number of free bytes), so these run
without a GPU; the GPU path differs only in where the free memory is read.
"""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import build_hf_model

from ttscale.engine import memory
from ttscale.engine.engine import Engine
from ttscale.model import block_bytes, load_model

MB = 1 << 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    build_hf_model("llama", directory)
    return load_model(directory, dtype="float32")


@pytest.fixture
def free(monkeypatch):
    """A fresh budget registry and a settable free-memory reading (bytes), 10 MB to start."""
    monkeypatch.setattr(memory, "_BUDGETS", {})
    reading = {"bytes": 10 * MB}
    monkeypatch.setattr(memory, "free_memory", lambda device: reading["bytes"])
    return reading


def pool_bytes(engine: Engine) -> int:
    per_block = block_bytes(engine.model.config, engine.pool.block_size, torch.float32)
    return engine.pool.num_blocks * per_block


def test_policy_and_prm_split_one_budget(model, free):
    policy = Engine(model, memory_share=memory.POLICY_SHARE)
    free["bytes"] -= pool_bytes(policy)  # the policy's pool is allocated now
    prm = Engine(model, memory_share=memory.PRM_SHARE)
    budget = 0.9 * 10 * MB
    assert policy.memory_lease.bytes == int(0.6 * budget)
    assert prm.memory_lease.bytes == int(0.4 * budget)
    assert pool_bytes(policy) + pool_bytes(prm) <= budget


def test_asking_beyond_the_budget_names_every_lease(model, free):
    policy = Engine(model, memory_share=0.6)
    with pytest.raises(ValueError, match=r"memory_share: .* asks for 0\.50 .* only 0\.40 is left "
                                         r"\(the engine of a LlamaForCausalLM holds 0\.60\)"):
        Engine(model, memory_share=0.5)
    assert policy.memory_lease.share == 0.6


def test_no_share_means_what_is_left(model, free):
    """What an engine on a GPU gets when it names no share (on the CPU it gets 2 GiB instead)."""
    first = Engine(model, memory_share=0.7)
    rest = memory.lease("cpu", None, "the rest")
    assert rest.share == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"asks for 0\.00 .* only 0\.00 is left"):
        memory.lease("cpu", None, "one too many")
    assert first.memory_lease.share == 0.7


def test_a_lease_returns_when_its_engine_goes(model, free):
    engine = Engine(model, memory_share=1.0)
    del engine
    gc.collect()
    free["bytes"] = 20 * MB  # re-measured: no lease is held
    again = Engine(model, memory_share=1.0)
    assert again.memory_lease.bytes == int(0.9 * 20 * MB)


def test_a_lease_is_at_most_the_fraction_of_what_is_free_now(model, free):
    early = Engine(model, memory_share=0.5)
    free["bytes"] = 2 * MB  # another model's weights were loaded in between
    late = Engine(model, memory_share=0.5)
    assert late.memory_lease.bytes == int(0.9 * 2 * MB) < early.memory_lease.bytes


def test_a_failed_pool_allocation_returns_its_lease(model, free):
    free["bytes"] = 100  # holds no KV block
    with pytest.raises(ValueError, match="memory_share: .* hold no KV block"):  # what sized it
        Engine(model, memory_share=0.5)
    assert memory.device_budget("cpu").leases == {}


def test_bad_shares_are_named(model, free):
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="memory_share: expected a fraction in"):
            Engine(model, memory_share=share)
    with pytest.raises(ValueError, match="memory_share: give kv_budget_bytes or memory_share"):
        Engine(model, kv_budget_bytes=MB, memory_share=0.5)


def test_the_cpu_takes_no_share_unless_asked(model, free):
    engine = Engine(model, kv_budget_bytes=MB)
    assert engine.memory_lease is None and memory.device_budget("cpu").leases == {}


def test_token_balanced_shares():
    assert memory.token_balanced_shares(32, 128) == pytest.approx((0.2, 0.8))
    assert memory.token_balanced_shares(7) == (1.0,)
    with pytest.raises(ValueError, match="bytes_per_token: expected positive"):
        memory.token_balanced_shares(32, 0)


def test_pair_shares_split_a_gpu_and_leave_the_cpu_alone():
    assert memory.pair_shares("cpu") == (None, None)
    assert memory.pair_shares("cuda") == (memory.POLICY_SHARE, memory.PRM_SHARE)
    assert memory.pair_shares(torch.device("cuda", 0)) == (0.6, 0.4)


def test_the_embedded_policy_and_prm_split_one_budget(free):
    """The README's set-up: an LLM and a PRM with explicit shares of one device's budget (a
    default LLM takes all of it, and the PRM beside it is refused)."""
    import ttscale
    from ttscale.toy import policy_dir, prm_dir

    free["bytes"] = 64 * MB
    llm = ttscale.LLM(policy_dir(), device="cpu", memory_share=memory.POLICY_SHARE)
    prm = ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu",
                      memory_share=memory.PRM_SHARE)
    assert llm.engine.memory_lease.share == 0.6 and prm.engine.memory_lease.share == 0.4
    assert prm.engine.memory_lease.bytes == int(0.4 * int(0.9 * 64 * MB))
    del llm, prm
    gc.collect()
    alone = ttscale.LLM(policy_dir(), device="cpu", memory_share=1.0)
    with pytest.raises(ValueError, match=r"memory_share: .* only 0\.00 is left"):
        ttscale.PRM(prm_dir(), format="math-shepherd", device="cpu", memory_share=memory.PRM_SHARE)
    del alone
