"""The CPU thread governor: probes pick the count that is fastest per unit of work, the caller's
torch setting comes back after every step, and the engine's results do not depend on it."""

from __future__ import annotations

import pytest
import torch

from ttscale.engine import threads
from ttscale.engine.threads import ThreadGovernor, candidates
from ttscale.errors import InvalidArgument


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_steps(governor, clock, cost, steps, work=10, kind="decode"):
    """``steps`` steps whose seconds per unit of work at ``n`` threads is ``cost(n)``; returns
    the thread count each ran on (as torch saw it inside the step)."""
    seen = []

    def step():
        n = torch.get_num_threads()
        seen.append(n)
        clock.now += cost(n) * work

    for _ in range(steps):
        governor.run(kind, work, step)
    return seen


def test_candidates_halve_down_to_one():
    assert candidates(8) == [8, 4, 2, 1]
    assert candidates(6) == [6, 3, 1]
    assert candidates(1) == [1]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_probe_moves_to_one_thread_when_two_are_slower(two_threads):
    clock = Clock()
    governor = ThreadGovernor(most=2, clock=clock)
    # contended cores: two threads cost ten times one thread's time
    seen = run_steps(governor, clock, lambda n: 1e-3 if n == 1 else 1e-2, steps=200)
    assert seen[0] == 2  # no probe before MIN_INTERVAL
    assert governor.probes >= 1 and governor.choice("decode") == 1
    assert seen[-50:] == [1] * 50 or governor.probes > 1  # steps run on the choice between probes
    assert torch.get_num_threads() == 2  # the caller's count is back after every step


def test_an_idle_machine_keeps_every_thread(two_threads):
    clock = Clock()
    governor = ThreadGovernor(most=2, clock=clock)
    seen = run_steps(governor, clock, lambda n: 1e-3 / n, steps=300)
    assert governor.probes >= 1 and governor.choice("decode") == 2
    assert seen.count(1) == threads.PROBE_ROUNDS * governor.probes  # only probes ran on one


def test_confirmed_choices_probe_less_often_up_to_the_maximum(two_threads):
    clock = Clock()
    governor = ThreadGovernor(most=2, clock=clock)
    run_steps(governor, clock, lambda n: 1e-3 / n, steps=2000)
    assert governor.kinds["decode"].interval == threads.MAX_INTERVAL
    # 2000 steps of 5 ms: 10 s, probes at 0.5, 1.5, 3.5, 7.5 s and then every 8 s
    assert 4 <= governor.probes <= 6


def test_a_slowdown_starts_a_probe_at_once(two_threads):
    clock = Clock()
    governor = ThreadGovernor(most=2, clock=clock)
    contended = {"on": False}
    cost = lambda n: (1e-2 if n == 2 else 1e-3) if contended["on"] else 1e-3 / n  # noqa: E731
    run_steps(governor, clock, cost, steps=1500)
    assert governor.choice("decode") == 2
    probes = governor.probes
    contended["on"] = True  # a neighbour starts: two threads become ten times slower
    run_steps(governor, clock, cost, steps=2 + 2 * threads.PROBE_ROUNDS)
    assert governor.probes == probes + 1 and governor.choice("decode") == 1


def test_kinds_are_measured_apart(two_threads):
    clock = Clock()
    governor = ThreadGovernor(most=2, clock=clock)
    run_steps(governor, clock, lambda n: 1e-3 if n == 1 else 1e-2, steps=100, kind="decode")
    run_steps(governor, clock, lambda n: 1e-3 / n, steps=200, kind="prefill")
    assert governor.choice("decode") == 1 and governor.choice("prefill") == 2


def test_a_fixed_count_never_probes(two_threads):
    clock = Clock()
    governor = ThreadGovernor(fixed=1, clock=clock)
    seen = run_steps(governor, clock, lambda n: 1e-3 / n, steps=500)
    assert seen == [1] * 500 and governor.probes == 0
    assert torch.get_num_threads() == 2


def test_the_caller_gets_its_count_back_when_a_step_raises(two_threads):
    governor = ThreadGovernor(fixed=1)

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        governor.run("decode", 1, fail)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_cpu_threads_must_be_a_positive_int(bad, tmp_path_factory):
    from ttscale.engine.settings import check_engine_arguments

    with pytest.raises(InvalidArgument) as error:
        check_engine_arguments(cpu_threads=bad)
    assert error.value.param == "cpu_threads"


def test_generate_gives_the_same_tokens_whatever_the_thread_counts(two_threads):
    from ttscale.llm import LLM
    from ttscale.sampling_params import SamplingParams
    from ttscale.toy import policy_dir

    params = SamplingParams(n=8, temperature=1.0, max_tokens=40, seed=3)
    prompts = ["Q: (88-5)-18\n", "Q: 12*7+3\n"]
    outs = []
    for cpu_threads in (None, 1, 2):
        llm = LLM(policy_dir(), cpu_threads=cpu_threads)
        if cpu_threads is None:  # probe at every step: steps alternate between 2 and 1 thread
            llm.engine.runner.threads.kinds.clear()
            threads_module_interval = threads.MIN_INTERVAL
            threads.MIN_INTERVAL = 0.0
        try:
            outs.append([[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)])
        finally:
            if cpu_threads is None:
                threads.MIN_INTERVAL = threads_module_interval
    assert outs[0] == outs[1] == outs[2]
