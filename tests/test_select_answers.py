"""Final selection rules shared by the strategies."""

import math

import pytest

from ttscale.search.result import Candidate
from ttscale.search.select import aggregate, check_select, choose, group_answers


def cand(answer, score=None):
    return Candidate(text="", token_ids=[], steps=[], score=score, answer=answer)


@pytest.mark.parametrize("agg,expected", [("last", 0.5), ("min", 0.2), ("prod", 0.9 * 0.2 * 0.5), ("mean", 1.6 / 3)])
def test_aggregations(agg, expected):
    assert aggregate([0.9, 0.2, 0.5], agg) == pytest.approx(expected)


def test_aggregate_of_no_steps_is_none():
    assert aggregate([], "min") is None


def test_best_takes_highest_score():
    assert choose([cand("1", 0.2), cand("2", 0.9), cand("3", 0.5)], "best") == 1


def test_weighted_sums_scores_of_equivalent_answers():
    cands = [cand("1/2", 0.4), cand("0.5", 0.4), cand("3", 0.7)]
    chosen = choose(cands, "weighted")
    assert cands[chosen].answer in ("1/2", "0.5")


def test_majority_counts_equivalent_answers():
    cands = [cand("3", 0.9), cand("\\frac{1}{2}", 0.1), cand("0.5", 0.1)]
    assert cands[choose(cands, "majority")].answer in ("\\frac{1}{2}", "0.5")


def test_nan_score_never_wins():
    assert choose([cand("1", math.nan), cand("2", 0.1)], "best") == 1


def test_ties_go_to_the_earlier_candidate():
    assert choose([cand("1", 0.5), cand("2", 0.5)], "best") == 0
    assert choose([cand("1"), cand("2")], "majority") == 0


def test_no_answers_gives_none():
    assert choose([cand(None, 0.9)], "best") is None


def test_group_answers_uses_equality_once_per_distinct_text():
    calls = []

    def equal(a, b):
        calls.append((a, b))
        return a.strip("0") == b.strip("0")

    groups = group_answers(["5", "5", "50", None, "7"], equal)
    assert groups == [0, 0, 0, None, 1]
    assert len(calls) == 2


def test_select_defaults_and_errors():
    assert check_select(None, "last", has_verifier=False) == "majority"
    assert check_select(None, "last", has_verifier=True) == "weighted"
    with pytest.raises(ValueError, match="select: 'best' needs a verifier"):
        check_select("best", "last", has_verifier=False)
    with pytest.raises(ValueError, match="agg: expected one of"):
        check_select(None, "max", has_verifier=True)
    with pytest.raises(ValueError, match="select: expected one of"):
        check_select("top", "last", has_verifier=True)
