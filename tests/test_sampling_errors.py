"""Bad input to the sample op raises ValueError naming the argument, never a crash."""

from __future__ import annotations

import pytest
import torch
from ttscale import ops
from ttscale.testing import make_sampling_case


@pytest.fixture
def case():
    return make_sampling_case(4, 50, seed=1)


def sample(case, **changes):
    args = dict(logits=case.logits, temperature=case.temperature, top_k=case.top_k,
                top_p=case.top_p, min_p=case.min_p, seed=0, offsets=case.offsets)
    args.update(changes)
    return ops.sample(**args)


def with_row(t, row, value):
    t = t.clone()
    t[row] = value
    return t


@pytest.mark.parametrize("change,message", [
    (dict(logits=torch.zeros(4, 50, dtype=torch.int32)), "logits: expected dtype"),
    (dict(logits=torch.zeros(4, 5, 10)), "logits: expected 2 dimensions"),
    (dict(logits=[[0.0]]), "logits: expected a torch.Tensor"),
    (dict(logits=torch.zeros(4, 0)), "logits: expected at least one token per row, got V = 0"),
    (dict(temperature=torch.ones(3)), r"temperature: expected shape \[4\]"),
    (dict(temperature=torch.ones(4, dtype=torch.float64)), "temperature: expected dtype float32"),
    (dict(top_k=torch.zeros(4, dtype=torch.int64)), "top_k: expected dtype int32"),
    (dict(top_p=torch.ones(5)), r"top_p: expected shape \[4\]"),
    (dict(min_p=torch.zeros(4, 1)), r"min_p: expected shape \[4\]"),
    (dict(offsets=torch.zeros(4, dtype=torch.int32)), "offsets: expected dtype int64"),
    (dict(seed=1.5), "seed: expected an int, got float"),
    (dict(seed=-1), r"seed: expected an int in \[0, 2\*\*64\)"),
    (dict(seed=2**64), r"seed: expected an int in \[0, 2\*\*64\)"),
    (dict(num_logprobs=21), "num_logprobs: expected 0 to 20, got 21"),
    (dict(num_logprobs=-1), "num_logprobs: expected 0 to 20, got -1"),
])
def test_bad_argument(case, change, message):
    with pytest.raises(ValueError, match=message):
        sample(case, **change)


def test_num_logprobs_above_vocabulary():
    small = make_sampling_case(2, 5)
    with pytest.raises(ValueError, match="num_logprobs: expected 0 to 5, got 6"):
        sample(small, num_logprobs=6)


@pytest.mark.parametrize("name,value,message", [
    ("temperature", -0.5, "temperature: expected 0 or a positive finite number"),
    ("temperature", float("nan"), "temperature: expected 0 or a positive finite number"),
    ("temperature", float("inf"), "temperature: expected 0 or a positive finite number"),
    ("temperature", 1e-40, "temperature: expected 0 or a positive finite number"),
    ("top_k", -1, "top_k: expected >= 0"),
    ("top_p", 0.0, r"top_p: expected a value in \(0, 1\]"),
    ("top_p", 1.5, r"top_p: expected a value in \(0, 1\]"),
    ("top_p", float("nan"), r"top_p: expected a value in \(0, 1\]"),
    ("min_p", -0.1, r"min_p: expected a value in \[0, 1\]"),
    ("min_p", 1.01, r"min_p: expected a value in \[0, 1\]"),
])
def test_bad_value(case, name, value, message):
    bad = with_row(getattr(case, name), 2, value)
    with pytest.raises(ValueError, match=message + ".* at row 2"):
        sample(case, **{name: bad})


@pytest.mark.parametrize("value,message", [
    (float("nan"), "logits: row 1 contains NaN or \\+inf"),
    (float("inf"), "logits: row 1 contains NaN or \\+inf"),
])
def test_bad_logits_value(case, value, message):
    logits = case.logits.clone()
    logits[1, 7] = value
    with pytest.raises(ValueError, match=message):
        sample(case, logits=logits)


def test_banned_tokens_and_huge_logits_are_accepted(case):
    """-inf marks a banned token, and finite logits whose sum overflows are still finite."""
    logits = case.logits.clone()
    logits[0, :10] = float("-inf")
    logits[2, :40] = 1e37  # their sum, 4e38, is beyond float32
    tokens, _, _ = sample(case, logits=logits, temperature=with_row(case.temperature, 2, 1.0))
    assert tokens[0] >= 10 and tokens[2] < 40


def test_row_of_banned_tokens(case):
    logits = case.logits.clone()
    logits[3] = float("-inf")
    with pytest.raises(ValueError, match="logits: row 3 is all -inf"):
        sample(case, logits=logits)


def test_device_mismatch_named(case):
    with pytest.raises(ValueError, match="temperature: expected device"):
        sample(case, temperature=case.temperature.to("meta"))
