"""Strategies are declared once (ttscale.search.registry): the public function, its signature and
docstring, ``ttscale run``'s flags, the demo's choices, the server's extra body and
compute-optimal's menu all come from the declaration."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import dataclass

import pytest

import ttscale
from ttscale import demo, run_command
from ttscale.errors import InvalidArgument
from ttscale.search import registry
from ttscale.search.common import Inputs
from ttscale.search.compute_optimal_menu import menu
from ttscale.search.registry import Options, option, strategy
from ttscale.toy import policy_dir

EXPECTED = {  # name -> its own options
    "beam_search": ("beam_width", "max_iterations"),
    "best_of_n": (),
    "budget_forcing": ("budget", "min_thinking_tokens", "max_extensions", "continue_text"),
    "dvts": ("beam_width", "max_iterations"),
    "lookahead": ("beam_width", "max_iterations", "lookahead"),
    "particle_filtering": ("resample_temperature", "max_iterations"),
    "rebase": ("balance_temperature", "max_iterations"),
    "mcts": ("branching", "exploration", "widening", "rollouts", "max_generated_tokens"),
    "rejection_best_of_n": ("check_every", "reject_fraction"),
    "revisions": ("sequential", "window", "revision_fn"),
    "deepconf": ("confidence_window", "confidence_top_k", "confidence_score", "confidence_tail",
                 "keep_fraction", "n_init", "consensus"),
    "rsa": ("aggregation_size", "aggregation_rounds", "aggregate_fn"),
}


def test_the_registry_holds_every_strategy_with_its_options():
    known = registry.strategies()
    assert {name: spec.option_names for name, spec in known.items() if name in EXPECTED} == EXPECTED
    assert list(known) == sorted(known)
    assert set(menu()) == {"best_of_n", "beam_search", "dvts", "lookahead"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_public_function_is_built_from_the_declaration(name):
    spec = registry.get(name)
    function = getattr(ttscale, name)
    assert function is spec.function and function.__name__ == name
    parameters = inspect.signature(function).parameters
    assert list(parameters)[:3] == ["llm", "problems", "n"]
    for field in dataclasses.fields(spec.options):
        assert field.name in parameters
        if field.default is not dataclasses.MISSING:
            assert parameters[field.name].default == field.default
        assert f"{field.name} :" in function.__doc__  # documented from its declaration
    for common in ("select", "agg", "seed", "problem_ids", "progress", "verifier", "sampling"):
        assert common in parameters and f"{common} :" in function.__doc__
    assert spec.summary and spec.summary in function.__doc__


def test_cli_flags_come_from_the_declarations():
    parser = argparse.ArgumentParser()
    run_command.add_strategy_flags(parser)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    declared = {f.name for spec in registry.strategies().values()
                for f in dataclasses.fields(spec.options) if f.metadata["flag"]}
    assert set(flags) == declared and "revision_fn" not in flags  # functions are not flags
    assert "beam_search" in flags["beam_width"].help and "dvts" in flags["beam_width"].help
    assert parser.parse_args(["--reject-fraction", "0.25"]).reject_fraction == 0.25
    with pytest.raises(SystemExit):
        parser.parse_args(["--reject-fraction", "1"])  # [0, 1), as declared


@pytest.fixture
def declared(monkeypatch):
    """A strategy declared in this test module, as a new strategy's own file would: the
    registry, the CLI, the demo and the server see it with no other edit."""
    registry.strategies()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @dataclass(frozen=True)
    class EchoOptions(Options):
        repeats: int = option(2, "Times each problem is echoed.", metavar="R")
        volume: float = option(0.5, "How loud, in [0, 1].", kind="float", low=0.0, high=1.0)

    @strategy(EchoOptions, budget="Echoes per problem.", name="echo_for_tests")
    def echo(inputs: Inputs, n: int, options: EchoOptions):
        """Echo each problem (a strategy for tests)."""
        return [(p, n, options.repeats, options.volume) for p in inputs.problems]

    return echo


@pytest.fixture(scope="module")
def llm(one_thread):
    return ttscale.LLM(policy_dir(), device="cpu", kv_budget_bytes=8 << 20)


def test_a_new_strategy_is_everywhere_from_its_declaration(declared, llm):
    assert registry.get("echo_for_tests").function is declared
    assert declared(llm, ["Q: 1+1\n"], 3, repeats=4) == [("Q: 1+1\n", 3, 4, 0.5)]
    assert "echo_for_tests" in demo.choices()
    parser = argparse.ArgumentParser()
    run_command.add_strategy_flags(parser)
    assert parser.parse_args(["--repeats", "3"]).repeats == 3
    assert run_command.flag_options()["volume"][1] == ["echo_for_tests"]


@pytest.mark.parametrize("kwargs, param", [
    (dict(repeats=True), "repeats"),        # a bool is not a count
    (dict(repeats=2.0), "repeats"),         # nor is a float
    (dict(repeats="2"), "repeats"),         # nor a string
    (dict(repeats=0), "repeats"),           # below its declared range
    (dict(volume=1.5), "volume"),
    (dict(volume=float("nan")), "volume"),
    (dict(volume=False), "volume"),
    (dict(loudness=1), "loudness"),         # not an option at all
    (dict(n=0), "n"),
])
def test_options_are_checked_as_declared(declared, llm, kwargs, param):
    arguments = {"n": 2, **kwargs}
    n = arguments.pop("n")
    with pytest.raises(InvalidArgument) as caught:
        declared(llm, ["Q: 1+1\n"], n, **arguments)
    assert caught.value.param == param and param in str(caught.value)


def test_missing_and_surplus_arguments_name_what_is_wrong(llm):
    with pytest.raises(InvalidArgument) as caught:
        ttscale.revisions(llm, ["Q: 1+1\n"], 4)  # sequential is required
    assert caught.value.param == "sequential"
    with pytest.raises(InvalidArgument) as caught:
        ttscale.revisions(llm, ["Q: 1+1\n"], 4, 3)  # does not divide n
    assert caught.value.param == "sequential"
    with pytest.raises(InvalidArgument) as caught:
        ttscale.beam_search(llm, ["Q: 1+1\n"], 4, None, None, "extra")
    assert caught.value.param == "n" or "positional" in str(caught.value)


def test_declaring_a_name_twice_is_refused(declared):
    with pytest.raises(ValueError, match="declared twice"):
        strategy(budget="x", name="echo_for_tests")(lambda inputs, n, options: [])


def test_for_budget_gives_the_demo_runnable_options():
    for name in ("beam_search", "dvts", "lookahead"):
        options = registry.get(name).options
        for n in (1, 2, 4, 16, 64):
            options(**options.for_budget(n)).check(n)  # raises if not runnable
