"""PRM formats, incremental PRM/ORM scoring, forks, cost accounting and errors (CPU, tiny models).

References are built independently of ttscale.verifiers.formats, the way each format's public
reference code builds them: the whole text through transformers' tokenizer (and its chat
template renderer), tag positions found in the whole sequence, scores from one transformers
forward over the whole sequence (tests/prm_models.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
import ttscale
from paged import assert_close
from prm_models import (
    QUESTION,
    STEPS,
    build_prm,
    build_tokenizer,
    byte_level_tokenizer,
    math_corpus,
    reference_scores,
    save_tokenizer,
)
from ttscale.model import load_tokenizer
from ttscale.verifiers import ORM, PRM, FormatError, split_steps
from ttscale.verifiers.formats import QWEN_PRM_SYSTEM_PROMPT, make_format, math_shepherd_text

TOY_CASE = ("Q: ((37+48)*3)-12\n", ["37+48=85", "85*3=255", "255-12=243", "answer: 243"])
CASES = [
    (QUESTION, STEPS),
    # The question ends with a newline; steps open with punctuation.
    ("Compute 12*(3+4).\n", ["(3+4) = 7, so 12*7", "= 84.", "+84 is positive; the answer is 84"]),
    # The question ends with a space.
    ("What is 2 + 2? ", ["2 + 2 = 4", "4"]),
]
# The text that opens an assistant turn in each test template.
ASSISTANT_HEADER = {"chatml": "<|im_start|>assistant\n",
                    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
LAYOUTS = [("math-shepherd", "toy"), ("math-shepherd", "sentencepiece"),
           ("math-shepherd", "chatml"), ("math-shepherd", "llama3"), ("rlhflow", "llama3"),
           ("rlhflow", "chatml"), ("qwen2.5-math-prm", "chatml"), ("skywork", "chatml"),
           ("skywork", "sentencepiece")]
# (format, tokenizer) of the tiny PRMs
MODELS = [("math-shepherd", "sentencepiece"), ("math-shepherd", "toy"), ("rlhflow", "llama3"),
          ("qwen2.5-math-prm", "chatml"), ("skywork", "chatml")]
CPU = dict(device="cpu", kv_budget_bytes=1 << 20, block_size=8)


def cases_for(tokenizer: str):
    return [TOY_CASE] if tokenizer == "toy" else CASES


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_tokenizer(name, tmp_path_factory.mktemp(f"tok-{name}"))
        return built[name]

    return get


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, tokenizer_dir):
    """(format, tokenizer) -> (directory, transformers model and head for rescoring)."""
    built = {}

    def get(fmt: str, tokenizer: str):
        if (fmt, tokenizer) not in built:
            directory = tmp_path_factory.mktemp(f"prm-{fmt}-{tokenizer}")
            source = tokenizer_dir(tokenizer)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (directory / name).write_bytes((source / name).read_bytes())
            vocab = load_tokenizer(directory).vocab_size
            built[fmt, tokenizer] = directory, build_prm(fmt, directory, vocab)
        return built[fmt, tokenizer]

    return get


def reference_layout(fmt: str, directory, tokenizer: str, question: str, steps: list[str]):
    """Token ids of the whole text and the positions read for each step, built as the format's
    reference code builds them."""
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    if fmt == "math-shepherd":
        ids = hf.encode(math_shepherd_text(question, steps))
        return ids, [i for i, t in enumerate(ids) if hf.decode([t]).endswith("ки")]
    if fmt == "rlhflow":
        chat = []
        for k, step in enumerate(steps):
            chat += [{"role": "user", "content": f"{question} {step}" if k == 0 else step},
                     {"role": "assistant", "content": "+"}]
        text = hf.apply_chat_template(chat, tokenize=False)
        encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        header = ASSISTANT_HEADER[tokenizer]
        answers = [i for i, (a, b) in enumerate(encoded["offset_mapping"])
                   if text[a:b] == "+" and text[:a].endswith(header)]
        return encoded["input_ids"], [i - 1 for i in answers]  # the token that predicts "+"
    if fmt == "qwen2.5-math-prm":
        chat = [{"role": "system", "content": QWEN_PRM_SYSTEM_PROMPT},
                {"role": "user", "content": question},
                {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
        ids = hf.encode(hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=False))
        tag = hf.convert_tokens_to_ids("<extra_0>")
        return ids, [i for i, t in enumerate(ids) if t == tag]
    # skywork: the prompt, then each line of the response encoded alone and closed by the
    # newline's token id; a step's score is read at its last line's newline
    ids, positions = hf.encode((hf.bos_token or "") + question + "\n"), []
    newline = hf.encode("\n")[-1]
    for step in steps:
        for line in step.split("\n"):
            if line:
                ids += hf.encode(line) + [newline]
        positions.append(len(ids) - 1)
    return ids, positions


def incremental_layout(fmt: str, directory, question: str, steps: list[str]):
    layout = make_format(fmt, load_tokenizer(directory))
    segment = layout.prefix(question)
    ids, positions = list(segment.ids), []
    for k, step in enumerate(steps):
        segment = layout.step(step, k, segment)
        ids += segment.ids
        positions.append(len(ids) - 1)
    return ids, positions


# ---------------------------------------------------------------------------------------------
# Formats: token ids and tag positions


@pytest.mark.parametrize("fmt,tokenizer", LAYOUTS, ids=[f"{f}-{t}" for f, t in LAYOUTS])
def test_step_by_step_tokens_equal_the_whole_texts_tokens(tokenizer_dir, fmt, tokenizer):
    directory = tokenizer_dir(tokenizer)
    for question, steps in cases_for(tokenizer):
        ids, positions = incremental_layout(fmt, directory, question, steps)
        ref_ids, ref_positions = reference_layout(fmt, directory, tokenizer, question, steps)
        assert len(ref_positions) == len(steps)
        assert ids == ref_ids[: len(ids)]
        assert positions == ref_positions
        # Past the last tag, the whole text holds only what closes the last step.
        hf = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
        trailer = hf.decode(ref_ids[len(ids):], skip_special_tokens=False)
        expected = {"math-shepherd": "\n", "rlhflow": "+", "qwen2.5-math-prm": "<|im_end|>\n",
                    "skywork": ""}[fmt]
        assert trailer.startswith(expected) and len(ref_ids) - len(ids) <= 3


def test_skywork_prefix_starts_with_the_bos_text(tmp_path):
    directory = build_tokenizer("chatml", tmp_path, bos_token="<|endoftext|>")
    ids, _ = incremental_layout("skywork", directory, QUESTION, STEPS)
    ref_ids, _ = reference_layout("skywork", directory, "chatml", QUESTION, STEPS)
    assert ids == ref_ids
    assert ids[0] == load_tokenizer(directory).token_to_id("<|endoftext|>")


def test_chat_templates_system_prompt_is_a_parameter(tokenizer_dir):
    layout = make_format("qwen2.5-math-prm", load_tokenizer(tokenizer_dir("chatml")),
                         system_prompt="Be brief.")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in layout.prefix("2+2?").text


# ---------------------------------------------------------------------------------------------
# Incremental scoring


def prm_for(prm_dir, fmt, tokenizer, cls=PRM):
    directory, built = prm_dir(fmt, tokenizer)
    return cls(directory, format=fmt, **CPU), directory, built


def expected_scores(fmt, tokenizer, directory, built, prm, question, steps):
    ref_ids, positions = reference_layout(fmt, directory, tokenizer, question, steps)
    return reference_scores(fmt, built, ref_ids, positions, prm.format.head_tokens)


@pytest.mark.parametrize("fmt,tokenizer", MODELS, ids=[f"{f}-{t}" for f, t in MODELS])
def test_incremental_scores_equal_full_rescoring(prm_dir, fmt, tokenizer):
    prm, directory, built = prm_for(prm_dir, fmt, tokenizer)
    question, steps = cases_for(tokenizer)[0]
    (path,) = prm.start([question])
    scores = [prm.score([path], [step], [k == len(steps) - 1])[0] for k, step in enumerate(steps)]
    ref_ids, positions = reference_layout(fmt, directory, tokenizer, question, steps)
    assert path.token_ids == ref_ids[: len(path.token_ids)]
    assert path.tag_positions == positions
    expected = reference_scores(fmt, built, ref_ids, positions, prm.format.head_tokens)
    assert scores == pytest.approx(expected, abs=1e-4)
    assert any(0.02 < s < 0.98 for s in scores), "scores saturate: the comparison shows little"


@pytest.mark.parametrize("fmt,tokenizer", MODELS[1:], ids=[f"{f}-{t}" for f, t in MODELS[1:]])
def test_forked_paths_of_several_problems_score_like_independent_ones(prm_dir, fmt, tokenizer):
    prm, directory, built = prm_for(prm_dir, fmt, tokenizer)
    cases = cases_for(tokenizer)
    if len(cases) == 1:  # toy: two problems from the one case
        question, steps = cases[0]
        cases = [cases[0], (question.replace("12", "11"), [s.replace("3", "4") for s in steps])]
    (q0, s0), (q1, s1) = cases[:2]
    roots = prm.start([q0, q1])
    paths = prm.fork(roots, [0, 0, 1])
    alternative = s1[0]
    got = prm.score(paths, [s0[0], alternative, s1[0]], [False] * 3)
    kids = prm.fork(paths, [1, 1, 2])
    got += prm.score(kids, [s0[1], s0[0], s1[1]], [False] * 3)
    texts = [(q0, [s0[0]]), (q0, [alternative]), (q1, [s1[0]]),
             (q0, [alternative, s0[1]]), (q0, [alternative, s0[0]]), (q1, s1[:2])]
    expected = [expected_scores(fmt, tokenizer, directory, built, prm, q, s)[-1] for q, s in texts]
    assert got == pytest.approx(expected, abs=1e-4)


def test_forks_share_the_prefix_and_add_only_suffix_blocks(prm_dir):
    prm, _, _ = prm_for(prm_dir, "qwen2.5-math-prm", "chatml")
    blocks = prm.engine.pool
    (root,) = prm.start([QUESTION])
    (path,) = prm.fork([root], [0])
    prm.score([path], [STEPS[0]], [False])
    used = blocks.num_blocks - blocks.refresh()
    kids = prm.fork([path], [0, 0, 0])
    assert blocks.num_blocks - blocks.refresh() == used  # a fork copies no block
    length, size = path.seq.kv_len, blocks.block_size
    steps = [STEPS[1], STEPS[2], "x"]
    new_tokens = [len(prm.format.step(s, 1, path.last).ids) for s in steps]
    prm.score(kids, steps, [False] * 3)
    # Each child takes blocks for its own new tokens, plus a private copy of the shared partial
    # block it writes into; the prefix and the parent's full blocks stay shared.
    ceil = lambda n: -(-n // size)
    grown = sum(ceil(length + n) - ceil(length) + (length % size > 0) for n in new_tokens)
    assert blocks.num_blocks - blocks.refresh() == used + grown
    for kid in kids:
        shared = length // size
        assert blocks.read_table(kid.seq.row)[:shared] == blocks.read_table(path.seq.row)[:shared]
    prm.free([root, path, *kids])
    assert blocks.refresh() == blocks.num_blocks


def test_scored_tokens_counts_each_token_once(prm_dir):
    prm, _, _ = prm_for(prm_dir, "skywork", "chatml")
    (root,) = prm.start([QUESTION])
    assert prm.scored_tokens == len(root.token_ids) - 1  # the prefix, but its last token
    (path,) = prm.fork([root], [0])
    for step in STEPS[:2]:
        prm.score([path], [step], [False])
    assert prm.scored_tokens == len(path.token_ids)
    before = prm.scored_tokens
    kids = prm.fork([path], [0, 0])
    prm.score(kids, ["a", STEPS[2]], [True, True])
    assert prm.scored_tokens - before == sum(len(k.token_ids) - len(path.token_ids) for k in kids)


def test_trailing_delimiter_makes_no_empty_step(prm_dir):
    prm, _, _ = prm_for(prm_dir, "skywork", "chatml")
    assert split_steps("a\n\nb\n\n") == ["a", "b"]
    assert split_steps("a\nb\n", "\n") == ["a", "b"]
    assert len(prm.score_text(QUESTION, "\n\n".join(STEPS) + "\n\n")) == len(STEPS)


def test_freeing_every_path_returns_every_block(prm_dir):
    prm, _, _ = prm_for(prm_dir, "rlhflow", "llama3")
    roots = prm.start([QUESTION, CASES[1][0]])
    paths = prm.fork(roots, [0, 1, 1])
    prm.score(paths, STEPS[:3], [False] * 3)
    prm.free(roots)
    assert prm.engine.pool.refresh() < prm.engine.pool.num_blocks  # the paths hold them
    prm.free(paths)
    assert prm.engine.pool.refresh() == prm.engine.pool.num_blocks


# ---------------------------------------------------------------------------------------------
# ORM


def test_orm_scores_only_the_final_step(prm_dir):
    orm, directory, built = prm_for(prm_dir, "qwen2.5-math-prm", "chatml", cls=ORM)
    (path,) = orm.start([QUESTION])
    prefix_tokens = orm.scored_tokens
    scores = [orm.score([path], [step], [k == len(STEPS) - 1])[0] for k, step in enumerate(STEPS)]
    assert scores[:-1] == [None] * (len(STEPS) - 1)
    expected = expected_scores("qwen2.5-math-prm", "chatml", directory, built, orm, QUESTION, STEPS)
    assert scores[-1] == pytest.approx(expected[-1], abs=1e-4)
    assert orm.scored_tokens - prefix_tokens == len(path.token_ids) - prefix_tokens


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_format_is_an_error_naming_format(prm_dir):
    directory, _ = prm_dir("skywork", "chatml")
    with pytest.raises(ValueError, match="format: expected one of"):
        PRM(directory, format="shepherd", **CPU)


def test_format_needing_another_head_is_an_error_naming_format(prm_dir):
    directory, _ = prm_dir("skywork", "chatml")
    with pytest.raises(ValueError, match="format: 'math-shepherd' reads a 'lm' head"):
        PRM(directory, format="math-shepherd", **CPU)


def test_causal_lm_prm_without_format_is_an_error_naming_format(prm_dir):
    directory, _ = prm_dir("rlhflow", "llama3")
    with pytest.raises(ValueError, match="format: a LlamaForCausalLM PRM reads token logits"):
        PRM(directory, **CPU)


def test_reward_head_implies_its_format(prm_dir):
    directory, _ = prm_dir("skywork", "chatml")
    assert PRM(directory, **CPU).format.name == "skywork"


def test_missing_step_tag_is_an_error_naming_step_tag(tmp_path):
    corpus = [line.replace("ки", "") for line in math_corpus()]
    directory = save_tokenizer(byte_level_tokenizer(["<|endoftext|>"], corpus=corpus), tmp_path)
    with pytest.raises(FormatError, match="step_tag: 'ки' is not one token"):
        make_format("math-shepherd", load_tokenizer(directory))


def test_missing_extra_0_is_an_error_naming_format(tokenizer_dir):
    with pytest.raises(FormatError, match="format: 'qwen2.5-math-prm' tags steps with <extra_0>"):
        make_format("qwen2.5-math-prm", load_tokenizer(tokenizer_dir("llama3")))


@pytest.mark.parametrize("fmt", ["rlhflow", "qwen2.5-math-prm"])
def test_chat_format_without_chat_template_is_an_error_naming_format(tmp_path, fmt):
    directory = build_tokenizer("chatml", tmp_path, chat_template=None)
    with pytest.raises(FormatError, match=f"format: '{fmt}' renders the model's chat template"):
        make_format(fmt, load_tokenizer(directory))


def test_head_token_of_several_tokens_is_an_error_naming_it(tokenizer_dir):
    with pytest.raises(FormatError, match="good_token: 'perfect square' is not one token"):
        make_format("rlhflow", load_tokenizer(tokenizer_dir("llama3")), good_token="perfect square")


def test_option_of_another_format_is_an_error_naming_it(tokenizer_dir):
    with pytest.raises(ValueError, match="system_prompt: the 'skywork' format takes no"):
        make_format("skywork", load_tokenizer(tokenizer_dir("chatml")), system_prompt="Hi")


def test_bad_score_calls_are_errors_naming_the_argument(prm_dir):
    prm, _, _ = prm_for(prm_dir, "skywork", "chatml")
    (root,) = prm.start([QUESTION])
    with pytest.raises(ValueError, match="steps: expected one step"):
        prm.score([root], ["a", "b"], [False])
    with pytest.raises(ValueError, match="paths: a path appears twice"):
        prm.score([root, root], ["a", "b"], [False, False])
    with pytest.raises(ValueError, match="steps: path 0 would reach"):
        prm.score([root], ["x " * 600], [False])
    prm.free([root])
    with pytest.raises(ValueError, match="paths: path 0 was freed"):
        prm.score([root], ["a"], [False])
    with pytest.raises(ValueError, match="parents: path 0 was freed"):
        prm.fork([root], [0])


# ---------------------------------------------------------------------------------------------
# Package surface


def test_prm_is_exported_from_the_package_top():
    assert ttscale.PRM is PRM and ttscale.ORM is ORM
    assert "PRM" in dir(ttscale)


def test_importing_ttscale_does_not_import_torch():
    code = "import sys, ttscale; ttscale.__version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_run_pending_returns_hidden_states_only_where_asked(prm_dir):
    prm, _, _ = prm_for(prm_dir, "skywork", "chatml")
    (root,) = prm.start([QUESTION])
    prm.engine.extend(root.seq, [5, 6, 7])
    hidden = prm.engine.run_pending([root.seq], hidden_at={root.seq: [1, 3]})
    assert list(hidden) == [root.seq] and hidden[root.seq].shape == (2, 64)
    # the final hidden states the model computes at those tokens, run over the whole sequence
    from tiny_models import PagedDriver

    prompt = root.seq.prompt.prompt_ids
    rows = torch.tensor([len(prompt) - 1 + 1, len(prompt) - 1 + 3])  # tokens[0] is the prompt's last
    expected = PagedDriver(prm.engine.model).prompt_hidden(prompt + [5, 6, 7], rows)
    assert_close(hidden[root.seq], expected, torch.float32, "hidden")
