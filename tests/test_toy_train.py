"""The toy trainer's smoke run produces policy and PRM directories our loader reads (issue 7)."""

import json
import math
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
    from ttscale.toy.model import TinyLlama

    # the sizes reported are those of the models written (the base grew past the policy)
    sizes = {name: TinyLlama.from_pretrained(tmp_path / name).num_parameters()
             for name in ("policy", "prm")}
    assert (report["parameters"], report["prm_parameters"]) == (sizes["policy"], sizes["prm"])
    assert all(0.0 <= v <= 1.0 for v in report["revisions"].values())
    # revisions work their products in parts, and a chain of them has room
    assert report["recipe"]["revision_worked"] and report["recipe"]["base_revisions"] > 0
    assert load_model(tmp_path / "policy").config.max_position_embeddings == 1024


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
    worked = revision_example(problem, attempts, worked=True)  # the target worked in parts
    assert worked.ids[: first + 1] == example.ids[: first + 1]
    trained = [t for t in worked.targets if t != -100]
    assert tok.decode(trained, skip_special_tokens=False) == problem.worked_solution() + "</s>"


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


def _flagged(example):
    """Each flagged token of a PRM example with its flag: (token, 1 if its result disagrees)."""
    tok = build_tokenizer()
    return [(tok.id_to_token(example.ids[j]), f) for j, f in enumerate(example.flags) if f != -100]


def test_result_flags_mark_each_digit_against_its_own_operands():
    from ttscale.toy import task
    from ttscale.toy.data import prm_example

    problem = task.parse_problem("((7*9)+5)-8")
    solution = "7*9=61\n61+5=66\n66-8=59\n3-5=-2\nanswer: 59\n"
    example = prm_example(problem, solution, flags=True)
    flagged = _flagged(example)
    # 7*9=61: '6' agrees with 63, '1' does not; 61+5=66 is right for its own operands (its tag
    # is still wrong: it builds on a wrong value); 66-8=59: '5' agrees, '9' does not; a
    # negative result is not read
    assert flagged == [("6", 0), ("1", 1), ("6", 0), ("6", 0), ("5", 0), ("9", 1)]
    assert example.targets == prm_example(problem, solution).targets  # the tag labels as before
    assert prm_example(problem, solution).flags is None


def test_result_flags_of_a_worked_step_are_on_its_result_after_the_parts():
    from ttscale.toy import task
    from ttscale.toy.data import Vocab, prm_example

    problem = task.parse_problem("(48*9)+5")
    solution = "48*9=40*9+8*9=360+36=396\n396+5=401\nanswer: 401\n"
    example = prm_example(problem, solution, flags=True)
    flagged = _flagged(example)
    # 396 against 432 (its parts are not read), then 401 right for its own operands
    assert flagged == [("3", 1), ("9", 1), ("6", 1), ("4", 0), ("0", 0), ("1", 0)]
    # the slip makes its step and every later one wrong
    assert [t for t in example.targets if t != -100] == [Vocab.load().bad] * 3


def test_prm_language_modelling_of_worked_solutions():
    from ttscale.toy import task
    from ttscale.toy.data import prm_lm_examples, prm_text

    problems = task.problems("train", 3, seed=5)
    tok = build_tokenizer()
    for problem, example in zip(problems, prm_lm_examples(problems, worked=True)):
        text = prm_text(problem, problem.worked_solution().splitlines())
        assert tok.decode(example.ids, skip_special_tokens=False) == "<s>" + text


def test_slip_twins_pair_the_slip_with_its_true_result():
    from ttscale.toy import task
    from ttscale.toy.data import slip_twins

    problem = task.parse_problem("((7*9)+5)-8")
    assert slip_twins(problem, "7*9=63\n63+5=69\n69-8=61\nanswer: 61\n") == (
        ["7*9=63", "63+5=68"], ["7*9=63", "63+5=69"])
    assert slip_twins(problem, "7*9=63\n64+5=69\n69-8=61\nanswer: 61\n") is None  # a copy error
    assert slip_twins(problem, problem.solution()) is None


def test_grown_model_computes_the_same_function_with_more_layers():
    import torch

    from ttscale.toy.model import TinyConfig, TinyLlama

    torch.manual_seed(0)
    model = TinyLlama(TinyConfig(build_tokenizer().get_vocab_size(), 32, 64, 2, 2, 64))
    grown = model.grown(2)
    assert grown.config.num_layers == 4 and model.config.num_layers == 2
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    torch.testing.assert_close(grown(ids), model(ids), rtol=0, atol=0)
    hidden = grown.hidden_states(ids)
    assert len(hidden) == 4
    torch.testing.assert_close(grown.logits_at(hidden[1]), model(ids), rtol=0, atol=0)
    # the added layers learn: their output projections are zero, the rest is not
    top = grown.model.layers[3]
    assert not top.self_attn.o_proj.weight.any() and not top.mlp.down_proj.weight.any()
    assert top.self_attn.q_proj.weight.any()


def test_prm_objective_is_the_sum_of_its_terms():
    import torch
    import torch.nn.functional as F

    from ttscale.toy import task
    from ttscale.toy.data import Vocab, batch, prm_example, prm_lm_example
    from ttscale.toy.model import TinyConfig, TinyLlama
    from ttscale.toy.train import PRMObjective

    torch.manual_seed(1)
    vocab = Vocab.load()
    base = TinyLlama(TinyConfig(build_tokenizer().get_vocab_size(), 32, 64, 2, 2, 128))
    model = base.grown(1)
    for p in model.parameters():  # the added layer no longer the identity
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else None
    problems = task.problems("train", 4, seed=2)
    rng = __import__("random").Random(0)
    examples = [prm_example(p, task.corrupt_solution(p, rng), flags=True) for p in problems[:3]]
    examples.append(prm_lm_example(problems[3]))
    weights = torch.tensor([0.7, 1.6])

    def objective(lm=0.0, flag=0.0, hint=0.0):
        torch.manual_seed(5)  # the same copy head each time
        return PRMObjective(model, 1, weights, lm_weight=lm, flag_weight=flag, hint_weight=hint)

    ids, targets = batch(examples, vocab.pad)
    with torch.no_grad():
        logits = model(ids)
        hidden = model.hidden_states(ids)
        # a tag with a label (in a language-modelling example a tag's target is the newline)
        tag = (ids == vocab.step_tag) & ((targets == vocab.good) | (targets == vocab.bad))
        assert tag.sum() > 3 and ((ids == vocab.step_tag) & ~tag).any()
        tag_loss = F.cross_entropy(logits[tag][:, [vocab.good, vocab.bad]],
                                   (targets[tag] == vocab.bad).long(), weight=weights)
        lm = (targets != -100) & ~tag
        lm_loss = F.cross_entropy(logits[lm], targets[lm])
        rows = [(i, j, f) for i, e in enumerate(examples) if e.flags
                for j, f in enumerate(e.flags) if f != -100]
        flag_logits = torch.stack([logits[i, j, [vocab.good, vocab.bad]] for i, j, _ in rows])
        flag_loss = F.cross_entropy(flag_logits, torch.tensor([f for _, _, f in rows]))
        assert len(rows) > 10 and {f for *_, f in rows} == {0, 1}
        head = objective(hint=1.0).copy_head
        teacher = model.logits_at(hidden[1]).log_softmax(-1)  # the base layers' prediction ...
        student = head(model.model.norm(hidden[2])).log_softmax(-1)  # ... read one position on
        kl = [F.kl_div(student[i, j + 1], teacher[i, j], log_target=True, reduction="sum")
              for i, e in enumerate(examples) for j in range(len(e.ids) - 1)]
        hint_loss = torch.stack(kl).mean()
        for kwargs, want in [({}, tag_loss), ({"lm": 0.5}, tag_loss + 0.5 * lm_loss),
                             ({"flag": 2.0}, tag_loss + 2.0 * flag_loss),
                             ({"hint": 0.3}, tag_loss + 0.3 * hint_loss)]:
            got = objective(**kwargs)(model, examples)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=str(kwargs))
    # every term reaches the parameters it should: the copy head through the hint only
    obj = objective(hint=1.0)
    obj(model, examples).backward()
    assert obj.copy_head.weight.grad.abs().sum() > 0
    assert model.model.layers[2].mlp.down_proj.weight.grad.abs().sum() > 0


def test_fit_slows_the_parameters_it_is_told_to():
    import torch

    from ttscale.toy import task
    from ttscale.toy.data import policy_examples
    from ttscale.toy.model import TinyConfig, TinyLlama
    from ttscale.toy.train import fit, policy_loss

    examples = policy_examples(task.problems("train", 16, seed=4))

    def trained(slow_scale):
        torch.manual_seed(0)
        model = TinyLlama(TinyConfig(build_tokenizer().get_vocab_size(), 32, 64, 2, 2, 128))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        embed = list(model.model.embed_tokens.parameters())
        fit(model, examples, steps=3, batch_size=4, lr=1e-2, seed=1, loss_fn=policy_loss, name="t",
            slow=None if slow_scale is None else (embed, slow_scale))
        return before, model.state_dict()

    before, stopped = trained(0.0)
    for name, value in stopped.items():  # a zero rate leaves them be, weight decay included
        assert torch.equal(value, before[name]) == (name == "model.embed_tokens.weight"), name
    _, plain = trained(None)
    _, unit = trained(1.0)  # a scale of one is no scale at all
    assert all(torch.equal(plain[k], unit[k]) for k in plain)
    _, slowed = trained(0.1)
    embed = "model.embed_tokens.weight"
    moved, full = ((m[embed] - before[embed]).abs().max() for m in (slowed, plain))
    assert 0 < moved < full


def test_fit_stopped_early_is_the_whole_runs_checkpoint():
    import torch

    from ttscale.toy import task
    from ttscale.toy.data import policy_examples
    from ttscale.toy.model import TinyConfig, TinyLlama
    from ttscale.toy.train import fit, policy_loss

    examples = policy_examples(task.problems("train", 12, seed=4))

    def run(stop):
        seen, states = [], []

        def loss_fn(model, batch):
            seen.append([id(e) for e in batch])
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            return policy_loss(model, batch)

        torch.manual_seed(0)
        model = TinyLlama(TinyConfig(build_tokenizer().get_vocab_size(), 16, 32, 1, 2, 128))
        fit(model, examples, steps=8, batch_size=4, lr=1e-2, seed=1, loss_fn=loss_fn, name="t",
            stop=stop)
        return seen, states, model.state_dict()

    seen, states, _ = run(None)
    stopped_seen, _, stopped = run(5)
    assert len(seen) == 8 and stopped_seen == seen[:5]  # the whole run's batches, in its order
    # the weights after five steps of the whole run (its rates, not those of a 5-step run)
    assert all(torch.equal(stopped[k], states[5][k]) for k in stopped)
    torch.manual_seed(0)
    model = TinyLlama(TinyConfig(build_tokenizer().get_vocab_size(), 16, 32, 1, 2, 128))
    fit(model, examples, steps=5, batch_size=4, lr=1e-2, seed=1, loss_fn=policy_loss, name="t")
    assert not all(torch.equal(model.state_dict()[k], stopped[k]) for k in stopped)


def test_lr_scale_warms_up_then_follows_the_cosine_of_the_whole_run():
    from ttscale.toy.train import fit, lr_scale

    assert lr_scale(0, 40) == 0.5  # warm-up over two steps, at the top of the cosine
    assert lr_scale(1, 40) == pytest.approx(0.55 + 0.45 * math.cos(math.pi / 40))
    assert lr_scale(39, 40) == pytest.approx(0.55 + 0.45 * math.cos(math.pi * 39 / 40))
    # a continuation from step 1600 of 3200 warms up over its own first 80 steps, then goes on
    # down the cosine of the whole run, to the rate a single run of 3200 ends at
    assert lr_scale(0, 1600, 1600, 3200) == pytest.approx(0.55 / 80)
    for step in (80, 700, 1599):
        assert lr_scale(step, 1600, 1600, 3200) == pytest.approx(lr_scale(1600 + step, 3200))
    with pytest.raises(ValueError, match="schedule"):
        fit(None, [], steps=10, batch_size=1, lr=1e-3, seed=0, loss_fn=None, name="t",
            schedule=(5, 12))


def test_train_base_grows_after_the_policy_and_the_policy_never_depends_on_it(tmp_path):
    from dataclasses import replace

    import torch

    from ttscale.toy import task
    from ttscale.toy.model import TinyConfig, TinyLlama
    from ttscale.toy.train import TINY, train_base

    # room for the worked solutions among the base's examples (TINY's base_revisions)
    config = TinyConfig(build_tokenizer().get_vocab_size(), 16, 32, 1, 2, 512)
    problems = task.problems("train", 48, seed=4)
    later = task.problems("train", 16, seed=6)

    def run(name, grown, later):
        torch.manual_seed(0)
        recipe = replace(TINY, base_steps=6, policy_step=4, batch_size=8,
                         prm_base_grown_layers=grown)
        base = train_base(config, recipe, 0, tmp_path / name, problems, later)
        return base, (tmp_path / name / "model.safetensors").read_bytes()

    base, policy = run("a", 1, later)
    assert TinyLlama.from_pretrained(tmp_path / "a").config.num_layers == 1
    assert base.config.num_layers == 2
    plain, same_policy = run("b", 0, [])
    assert plain.config.num_layers == 1 and same_policy == policy
    whole, _ = run("c", 3, later)
    assert whole.config.num_layers == 4
    # a base that ends at the policy's checkpoint is the policy
    torch.manual_seed(0)
    stopped = train_base(config, replace(TINY, base_steps=4, policy_step=4, batch_size=8), 0,
                         tmp_path / "d", problems, later)
    saved = TinyLlama.from_pretrained(tmp_path / "d").state_dict()
    assert stopped.config.num_layers == 1
    assert all(torch.equal(value, saved[name]) for name, value in stopped.state_dict().items())


def test_multiplication_rich_problems_have_their_multiplications_and_are_new():
    from ttscale.toy import task
    from ttscale.toy.train import multiplication_rich

    seen = {p.text for p in task.problems("train", 200, seed=11)}
    rich = multiplication_rich(50, 2, seen, seed=0)
    assert len(rich) == 50 == len({p.text for p in rich})
    assert all(sum(op == "*" for op, _ in p.ops) >= 2 and p.split == "train" for p in rich)
    assert not seen & {p.text for p in rich}
    assert multiplication_rich(50, 2, seen, seed=0) == rich
    with pytest.raises(ValueError, match="minimum"):
        multiplication_rich(5, 6, seen, seed=0)  # no problem has six: it would never finish


def test_base_examples_with_a_worked_share():
    from ttscale.search.revisions import REVISION_SEPARATOR
    from ttscale.toy import task
    from ttscale.toy.data import policy_examples, prm_lm_examples
    from ttscale.toy.train import _both_layouts

    problems = task.problems("train", 40, seed=8)
    plain = _both_layouts(problems)
    assert [e.ids for e in plain] == [e.ids for e in policy_examples(problems[:20])
                                      + prm_lm_examples(problems[20:])]
    mixed = _both_layouts(problems, 0.25)
    assert len(mixed) == 40
    assert [e.ids for e in mixed[:20]] == [e.ids for e in plain[:20]]  # the policy's half as it was
    assert [e.ids for e in mixed[30:]] == [e.ids for e in plain[30:]]
    tok = build_tokenizer()
    for problem, example in zip(problems[20:30], mixed[20:30]):
        context = problem.prompt + REVISION_SEPARATOR.lstrip("\n")
        worked = problem.worked_solution()
        assert tok.decode(example.ids, skip_special_tokens=False) == "<s>" + context + worked + "</s>"
        trained = [t for t in example.targets if t != -100]
        assert tok.decode(trained, skip_special_tokens=False) == worked + "</s>"


def test_worked_revision_chains(monkeypatch):
    """With revision_worked, a chain's first attempt is the policy's wrong sample, its later ones
    worked revisions (right, or with one slip), and the target the worked reference; without
    it, the chains are the policy's own wrong samples then the plain reference."""
    from dataclasses import replace

    from ttscale.search.revisions import REVISION_SEPARATOR
    from ttscale.toy import task, train

    problems = task.problems("train", 30, seed=12)
    wrong = [[f"1+1=3\nanswer: {p.answer + 1}\n"] * 3 for p in problems]
    monkeypatch.setattr(train, "sample", lambda *args: wrong)
    seen = {}

    def fit(model, examples, **kwargs):
        seen["examples"] = examples

    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(train.TinyLlama, "from_pretrained", lambda path: None)
    tok = build_tokenizer()
    for worked in (False, True):
        recipe = replace(train.TINY, revision_samples=3, revision_worked=worked,
                         revision_worked_right=0.5)
        _, stats = train.train_revisions(None, problems, problems, recipe, 0)
        assert stats["chains"] == 30
        right = slipped = 0
        for problem, sampled, example in zip(problems, wrong, seen["examples"][:30]):
            text = tok.decode(example.ids, skip_special_tokens=False)
            *attempts, target = text.removeprefix("<s>" + problem.prompt).split(REVISION_SEPARATOR)
            reference = problem.worked_solution() if worked else problem.solution()
            assert target == reference + "</s>"
            assert attempts[0] == sampled[0]  # the policy's own first attempt
            for attempt in attempts[1:]:
                if not worked:
                    assert attempt == sampled[0]
                    continue
                labels = task.label_steps(problem, attempt)
                right += all(labels)
                slipped += task.first_slip(problem, attempt) is not None
                assert all(labels) or task.first_slip(problem, attempt) is not None
        if worked:
            assert right > 3 and slipped > 3


def test_recipe_has_room_for_a_chain_of_worked_attempts():
    from ttscale.search.revisions import REVISION_SEPARATOR
    from ttscale.toy import task
    from ttscale.toy.train import NOMINAL

    # the shipped recipe: worked revisions, whose arithmetic the base learns before the policy's
    # checkpoint
    assert NOMINAL.revision_worked and NOMINAL.base_revisions > 0
    tok = build_tokenizer()
    separator = len(tok.encode(REVISION_SEPARATOR, add_special_tokens=False).ids)
    longest = max((p for p in task.problems("heldout", 500, seed=0)),
                  key=lambda p: len(p.worked_solution()))
    attempt = len(tok.encode(longest.worked_solution(), add_special_tokens=False).ids) + 1
    prompt = len(tok.encode(longest.prompt).ids)
    # the revision evaluation's chain: three earlier attempts with separators, then one more
    assert prompt + 3 * (attempt + separator) + attempt <= NOMINAL.max_positions


def test_train_base_gives_each_part_its_own_worked_share(tmp_path, monkeypatch):
    """base_revisions is the worked share of the steps to the policy's checkpoint,
    prm_base_revisions of the steps after it (which only the PRM goes on from)."""
    from dataclasses import replace

    from ttscale.search.revisions import REVISION_SEPARATOR
    from ttscale.toy import task, train
    from ttscale.toy.model import TinyConfig

    fits = []
    monkeypatch.setattr(train, "fit", lambda model, examples, **kw: fits.append(examples))
    tok = build_tokenizer()
    config = TinyConfig(tok.get_vocab_size(), 16, 32, 1, 2, 128)
    problems, later = task.problems("train", 40, seed=4), task.problems("train", 40, seed=6)
    for before, after in ((0.0, 0.0), (0.25, 0.0), (0.0, 0.5)):
        fits.clear()
        recipe = replace(train.TINY, base_steps=6, policy_step=4, base_revisions=before,
                         prm_base_revisions=after)
        train.train_base(config, recipe, 0, tmp_path / "p", problems, later)
        worked = [sum(REVISION_SEPARATOR.lstrip("\n") in tok.decode(e.ids) for e in examples)
                  for examples in fits]
        assert worked == [int(before * 40), int(after * 40)]
