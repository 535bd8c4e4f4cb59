"""SamplingParams validation and the step-stop table."""

import pytest

from ttscale.engine.stops import find_stop, stop_token_table
from ttscale.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.min_p, p.max_tokens) == (1, 1.0, 0, 1.0, 0.0, 256)
    assert p.stop_strings == ()


@pytest.mark.parametrize(
    "field,value",
    [("n", 0), ("temperature", -0.1), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0),
     ("max_tokens", 0), ("logprobs", 21), ("seed", 1.5), ("stop", [""]), ("seed", -1),
     ("seed", 2**64), ("seed", True), ("temperature", float("inf")), ("temperature", 1e-45),
     ("top_k", 2**31)],
)
def test_bad_field_is_named(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**{field: value})


def test_nan_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))


def test_stop_fires_on_every_token_containing_the_delimiter():
    texts = ["a", "\n", "\n\n", ".\n\n", "\n\n\n", "x\n", "b"]
    table = stop_token_table(texts, ["\n\n"])
    assert table.tolist() == [False, False, True, True, True, False, False]


def test_no_stops_means_empty_table():
    assert not stop_token_table(["a", "\n\n"], []).any()


def test_find_stop_earliest_of_several():
    assert find_stop("abc\n\ndef###", ["###", "\n\n"]) == 3
    assert find_stop("abc", ["\n\n"]) is None
    assert find_stop("a\n\nb\n\n", ["\n\n"], start=2) == 4
