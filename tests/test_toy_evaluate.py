"""The toy trainer's measuring sticks: a reference LM's step likelihood and the oracle ceiling
(issue 7's PRM work is judged against them)."""

import math

import pytest
import torch

from ttscale.toy import task
from ttscale.toy.data import Vocab, prm_text, solution_steps
from ttscale.toy.evaluate import arithmetic_slips, likelihood_step_scores, search_preview
from ttscale.toy.model import TinyConfig, TinyLlama
from ttscale.toy.tokenizer import build_tokenizer


def _model(seed: int) -> TinyLlama:
    torch.manual_seed(seed)
    model = TinyLlama(TinyConfig(build_tokenizer().get_vocab_size(), 32, 64, 1, 2, 128))
    for p in model.parameters():  # far from the small initialisation: probabilities that differ
        p.data.normal_(0.0, 0.2)
    return model.eval()


def _wrong(problem: task.Problem) -> str:
    """The first step's result and the final answer changed."""
    text = problem.solution().replace("=", "=1", 1)
    return text.replace(f"answer: {problem.answer}", f"answer: {problem.answer + 1}")


@torch.no_grad()
def test_likelihood_step_scores_are_each_steps_probability_given_what_precedes_it():
    tok, model = build_tokenizer(), _model(0)
    problems = task.problems("heldout", 2, seed=4)
    samples = [[p.solution(), _wrong(p), ""] for p in problems]  # "": a sample with no steps
    got = likelihood_step_scores(model, problems, samples)
    for problem, group, rows in zip(problems, samples, got, strict=True):
        for solution, row in zip(group, rows, strict=True):
            steps = solution_steps(solution)
            assert len(row) == len(steps)
            text = prm_text(problem, steps)
            for k, step in enumerate(steps):
                # the prefix up to step k, encoded alone; the step's tokens follow it
                prefix = text[: text.index(step, len(prm_text(problem, steps[:k])) - 1)]
                before, after = tok.encode(prefix).ids, tok.encode(prefix + step).ids
                logp = model(torch.tensor([after])).log_softmax(-1)[0]
                want = sum(logp[j - 1, after[j]].item() for j in range(len(before), len(after)))
                assert row[k] > 0.0 and math.log(row[k]) == pytest.approx(want, abs=1e-4)


def test_preview_oracle_picks_a_fully_right_sample_when_the_first_n_hold_one():
    problems = task.problems("heldout", 2, seed=5)
    right = [p.solution() for p in problems]
    samples = [[_wrong(problems[0])] * 3 + [right[0]],  # the right one is fourth
               [right[1]] + [_wrong(problems[1])] * 3]
    greedy = [_wrong(problems[0]), right[1]]
    preview = search_preview(_model(1), problems, samples, greedy, (1, 4))
    assert preview["greedy"] == 0.5
    assert preview["pass@n"] == {1: 0.5, 4: 1.0}
    assert preview["oracle"] == {1: 0.5, 4: 1.0}
    assert "reference_lm_min" not in preview  # only with a reference model
    with_lm = search_preview(_model(1), problems, samples, greedy, (1, 4), reference_lm=_model(2))
    assert set(with_lm["reference_lm_min"]) == {1, 4}
    assert all(0.0 <= v <= 1.0 for v in with_lm["reference_lm_min"].values())


class _ArithmeticJudge(torch.nn.Module):
    """A stand-in PRM that reads the step before each tag: ``sign=1`` scores a step with a true
    result high and a false one low, ``-1`` the reverse, ``0`` everything alike (blind)."""

    def __init__(self, sign: int):
        super().__init__()
        self.sign, self.tok, self.vocab = sign, build_tokenizer(), Vocab.load()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.tok.get_vocab_size())
        for b, row in enumerate(ids.tolist()):
            for j, token in enumerate(row):
                if token == self.vocab.step_tag:
                    text = "".join(self.tok.id_to_token(i) for i in row[:j])
                    step = task._STEP.match(text.split("\n")[-1].split()[-1])
                    true = step is not None and int(step[4]) == task.apply(
                        int(step[1]), step[2], int(step[3]))
                    logits[b, j, self.vocab.good] = 3.0 * self.sign * (1 if true else -1)
        return logits


def test_arithmetic_slips_ranks_each_distinct_slip_against_its_true_result():
    problem = task.Problem(37, (("+", 48), ("*", 3), ("-", 12)))  # 85, 255, 243
    slip_first = "37+48=95\n95*3=285\n285-12=273\nanswer: 273\n"
    slip_second = "37+48=85\n85*3=265\n265-12=253\nanswer: 253\n"
    copy_error = "37+46=83\n83*3=249\n249-12=237\nanswer: 237\n"  # operand wrong: not a slip
    samples = [[slip_first, slip_first, problem.solution(), copy_error, slip_second, ""]]
    results = {sign: arithmetic_slips(_ArithmeticJudge(sign), [problem], samples)
               for sign in (1, 0, -1)}
    assert {r["pairs"] for r in results.values()} == {2}  # the repeated slip counts once
    assert [results[s]["right_above_wrong"] for s in (1, 0, -1)] == [1.0, 0.5, 0.0]
    none = arithmetic_slips(_ArithmeticJudge(1), [problem], [[problem.solution(), copy_error]])
    assert none == {"pairs": 0, "right_above_wrong": None}
