"""The toy trainer's smoke run produces policy and PRM directories our loader reads (issue 7)."""

import json
import os
import subprocess
import sys

import pytest

from ttscale.model import load_model, load_tokenizer
from ttscale.toy.tokenizer import build_tokenizer


@pytest.mark.slow
def test_tiny_training_run_writes_loadable_models(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ttscale.toy.train", "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("policy", "prm"):
        model = load_model(tmp_path / name)
        assert model.config.vocab_size == build_tokenizer().get_vocab_size()
        assert load_tokenizer(tmp_path / name).decode(load_tokenizer(tmp_path / name).encode("Q: 1+2")) == "Q: 1+2"
    report = json.loads((tmp_path / "policy" / "training_report.json").read_text())
    # the metrics the script printed are kept beside the weights
    for key in ("policy_pass@1", "revisions", "revision_transitions", "revision_data", "prm_data",
                "prm_heldout", "preview"):
        assert key in report, key
    assert set(report["revision_transitions"]) == {"revised", "independent_resample"}
    assert "right_above_wrong" in report["prm_heldout"]["arithmetic_slips"]
    assert set(report["revisions"]) == {"1", "2"}  # first attempts against revised ones
    assert all(0.0 <= v <= 1.0 for v in report["revisions"].values())
    assert load_model(tmp_path / "policy").config.max_position_embeddings >= 512  # room for a chain


def test_revision_example_trains_only_the_last_attempt():
    from ttscale.search.revisions import REVISION_SEPARATOR, revision_context
    from ttscale.toy import task
    from ttscale.toy.data import Vocab, revision_example

    problem = task.problems("train", 1, seed=3)[0]
    attempts = ["1+1=3\nanswer: 3\n", "2*2=5\nanswer: 5\n"]
    example = revision_example(problem, attempts)
    tok = build_tokenizer()
    context = revision_context(problem.prompt, attempts)
    assert context.count(REVISION_SEPARATOR) == 2
    assert tok.decode(example.ids, skip_special_tokens=False) == "<s>" + context + problem.solution() + "</s>"
    trained = [t for t in example.targets if t != -100]
    assert tok.decode(trained, skip_special_tokens=False) == problem.solution() + "</s>"
    assert trained[-1] == Vocab.load().eos
    # position j predicts ids[j + 1]: the first target sits on the context's last token
    first = next(j for j, t in enumerate(example.targets) if t != -100)
    assert example.ids[first + 1] == example.targets[first]
    assert first + 1 == len(tok.encode(context).ids)


def test_transitions_count_later_attempts_by_the_earlier_ones_outcome():
    from ttscale.toy import task
    from ttscale.toy.train import resample_transitions, transitions

    pairs = [(True, True), (True, False), (True, True),
             (False, True), (False, False), (False, False), (False, False)]
    assert transitions(pairs) == {"after_right": round(2 / 3, 4), "after_wrong": 0.25}
    assert transitions([(True, True)]) == {"after_right": 1.0, "after_wrong": None}
    # independent samples: a problem with 2 of 3 right, one with 0 of 2; ordered pairs i != j
    problems = task.problems("heldout", 2, seed=6)
    right = [p.solution() for p in problems]
    pool = [[right[0], right[0], "answer: -1\n"], ["answer: -1\n", ""]]
    # after a right one: 2 of the 4 pairs from the first problem; after a wrong one: 2 of 4
    assert resample_transitions(problems, pool) == {"after_right": 0.5, "after_wrong": 0.5}
