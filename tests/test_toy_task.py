"""The embedded arithmetic task: generator, splits, step labels."""

import pytest

from ttscale.toy import task


def test_same_seed_same_problems():
    assert task.problems("train", 50, seed=3) == task.problems("train", 50, seed=3)
    assert task.problems("train", 50, seed=3) != task.problems("train", 50, seed=4)


def test_train_and_heldout_are_disjoint():
    train = {p.text for p in task.problems("train", 3000, seed=0)}
    heldout = {p.text for p in task.problems("heldout", 500, seed=0)}
    assert not train & heldout


def test_problems_respect_the_bounds():
    for p in task.problems("train", 500, seed=1):
        assert 2 <= p.num_ops <= 5
        value = p.first
        assert 1 <= p.first <= 99
        for op, operand in p.ops:
            assert 1 <= operand <= 99
            value = task.apply(value, op, operand)
            assert 0 <= value <= task.MAX_VALUE
        assert value == p.answer


def test_every_level_occurs():
    levels = {p.level for p in task.problems("heldout", 200, seed=0)}
    assert levels == {1, 2, 3, 4}


def test_solution_format():
    p = task.Problem(37, (("+", 48), ("*", 3), ("-", 12)))
    assert p.text == "((37+48)*3)-12"
    assert p.solution() == "37+48=85\n85*3=255\n255-12=243\nanswer: 243\n"
    assert task.parse_problem(p.prompt) == p
    assert task.final_answer(p.solution()) == "243"


def test_correct_solution_labels_all_right():
    p = task.Problem(37, (("+", 48), ("*", 3)))
    assert task.label_steps(p, p.solution()) == [True, True, True]


def test_arithmetic_error_and_everything_after_is_wrong():
    p = task.Problem(37, (("+", 48), ("*", 3)))
    assert task.label_steps(p, "37+48=86\n86*3=258\nanswer: 258\n") == [False, False, False]


def test_step_that_does_not_follow_is_wrong():
    p = task.Problem(37, (("+", 48), ("*", 3)))
    # right arithmetic, but the wrong operand for the problem's second operation
    assert task.label_steps(p, "37+48=85\n85*4=340\nanswer: 340\n") == [True, False, False]


def test_wrong_final_answer_line():
    p = task.Problem(37, (("+", 48), ("*", 3)))
    assert task.label_steps(p, "37+48=85\n85*3=255\nanswer: 254\n") == [True, True, False]


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        task.problems("test", 1)
