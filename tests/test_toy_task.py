"""The embedded arithmetic task: generator, splits, step labels, made-up errors."""

import random
import re

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


def test_near_miss_differs_and_stays_in_range():
    rng = random.Random(0)
    for value in [0, 7, 10, 99, 100, 5000, 9999, *range(0, 9999, 37)]:
        for _ in range(5):
            wrong = task.near_miss(value, rng)
            assert wrong != value and 0 <= wrong <= task.MAX_VALUE, (value, wrong)


def test_corrupt_solution_has_one_first_wrong_step_and_builds_on_it():
    rng = random.Random(1)
    kinds = {"slip": 0, "copy": 0}
    for problem in task.problems("train", 1000, seed=9):
        solution = task.corrupt_solution(problem, rng)
        labels = task.label_steps(problem, solution)
        assert len(labels) == problem.num_ops + 1
        k = labels.index(False)  # one step is wrong ...
        assert not any(labels[k:])  # ... and so is everything after it
        assert task.final_answer(solution) != str(problem.answer)
        lines = solution.splitlines()
        assert lines[:k] == problem.steps()[:k]  # right until the wrong step
        steps = [re.fullmatch(r"(-?\d+)([+\-*])(\d+)=(-?\d+)", line).groups()
                 for line in lines[:-1]]
        arithmetic = [task.apply(int(a), op, int(b)) == int(r) for a, op, b, r in steps]
        if task.first_slip(problem, solution) == k:  # a wrong result, every other step right
            kinds["slip"] += 1
            assert arithmetic == [i != k for i in range(len(steps))]
        else:  # an operand copied wrong, with the arithmetic on it right
            kinds["copy"] += 1
            assert all(arithmetic)
            assert lines[k].partition("=")[0] != problem.steps()[k].partition("=")[0]
        for i in range(k + 1, len(steps)):  # later steps start from the wrong step's result
            assert steps[i][0] == steps[i - 1][3]
    assert kinds["slip"] > 450 and kinds["copy"] > 250  # both kinds of error occur


def test_first_slip_finds_only_arithmetic_slips():
    problem = task.parse_problem("((7*9)+5)-8")
    assert task.first_slip(problem, problem.solution()) is None
    assert task.first_slip(problem, "7*9=61\n61+5=66\n66-8=58\nanswer: 58\n") == 0
    assert task.first_slip(problem, "7*9=63\n63+5=69\n69-8=61\nanswer: 61\n") == 1
    assert task.first_slip(problem, "7*9=63\n64+5=69\n69-8=61\nanswer: 61\n") is None  # copy error
    assert task.first_slip(problem, "7*9=63\n63*5=315\n") is None  # wrong operation
    assert task.first_slip(problem, "7*9=63\n63+5=68\n68-8=60\nanswer: 61\n") is None  # answer line
    assert task.first_slip(problem, "7*9=63\nhello\n") is None  # malformed step


def test_worked_step_writes_a_product_in_parts_and_sums_them_two_at_a_time():
    assert task.worked_step(48, "*", 9) == ("48*9=40*9+8*9=360+72=432", 432)
    assert task.worked_step(85, "*", 37) == (
        "85*37=80*30+80*7+5*30+5*7=2400+560+150+35=2960+150+35=3110+35=3145", 3145)
    assert task.worked_step(405, "*", 20) == ("405*20=400*20+5*20=8000+100=8100", 8100)
    # one part, a sum or a difference: written as in a first attempt
    assert task.worked_step(3, "*", 7) == ("3*7=21", 21)
    assert task.worked_step(40, "*", 2) == ("40*2=80", 80)
    assert task.worked_step(85, "+", 37) == ("85+37=122", 122)
    assert task.places(405) == [400, 5] and task.places(7) == [7]


def test_worked_solution_is_right_at_every_step_and_in_the_alphabet():
    from ttscale.toy.tokenizer import ALPHABET

    for problem in task.problems("heldout", 300, seed=4):
        worked = problem.worked_solution()
        assert task.label_steps(problem, worked) == [True] * (problem.num_ops + 1)
        assert task.final_answer(worked) == str(problem.answer)
        assert set(worked) <= set(ALPHABET)
        for line, plain in zip(task.step_lines(worked), problem.steps()):
            # the same step as the first attempt's, its parts between
            assert line.partition("=")[0] == plain.partition("=")[0]
            assert line.rpartition("=")[2] == plain.rpartition("=")[2]


def test_worked_slip_solution_has_one_slip_and_builds_on_it():
    rng = random.Random(2)
    in_parts = 0
    for problem in task.problems("train", 500, seed=6):
        solution = task.worked_slip_solution(problem, rng)
        labels = task.label_steps(problem, solution)
        k = labels.index(False)
        assert not any(labels[k:])
        assert task.first_slip(problem, solution) == k  # the right operands, a wrong result
        assert task.final_answer(solution) != str(problem.answer)
        lines = task.step_lines(solution)
        assert lines[:k] == task.step_lines(problem.worked_solution())[:k]
        in_parts += lines[k].count("=") > 1
        for before, after in zip(lines[k:-2], lines[k + 1 : -1]):  # later steps build on it
            assert re.match(r"-?\d+", after)[0] == before.rpartition("=")[2]
    assert in_parts > 100  # slips inside a product's parts occur


def test_a_worked_step_is_labelled_by_the_result_after_its_last_equals():
    problem = task.parse_problem("(48*9)+5")
    assert task.label_steps(problem, "48*9=40*9+8*9=360+72=432\n432+5=437\nanswer: 437\n") == [
        True, True, True]
    assert task.label_steps(problem, "48*9=40*9+8*9=360+36=396\n396+5=401\nanswer: 401\n") == [
        False, False, False]
    assert task.first_slip(problem, "48*9=40*9+8*9=360+36=396\n396+5=401\nanswer: 401\n") == 0
