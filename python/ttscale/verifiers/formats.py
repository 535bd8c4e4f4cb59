"""How each PRM format lays out a problem and its steps (the text its model was trained on).

A format turns a problem into a *prefix* (prefilled once, shared by every path of the problem)
and each step into a *segment*, the tokens that step appends. Every segment ends with the token
whose hidden state scores the step, so a step's tag position is always its segment's last token.
What a format's full text puts after a step's tag (Math-Shepherd's newline, RLHFlow's ``+``
answer and end of turn) opens the next step's segment instead; the last step never needs it,
because nothing after a tag changes a causal model's state at the tag.

Layouts (``q`` the problem, ``s1 .. sn`` the steps, ``|`` a segment boundary, ``^`` the token
read for a step):

- ``math-shepherd`` (:func:`math_shepherd_text`): ``q | " s1 ки"^ | "\\ns2 ки"^ | ...``; the
  ``+``/``-`` token logits at each ``ки``, softmax over the two, P(+). As in search-and-learn's
  ``MathShepherd`` PRM (``f"{question} {output}"`` with ``" ки"`` closing each step, the
  tokenizer's own special tokens, a BOS, in front).
- ``rlhflow``: the model's chat template over user turns holding the steps (the first one
  ``q + " " + s1``), each answered by an assistant ``+``: ``head + q | " s1" + <to assistant>^ |
  "+" + <to user> + "s2" + <to assistant>^ | ...``. The read token is the last one before the
  assistant's answer: it predicts ``+`` or ``-`` (softmax over the two, P(+)). As in RLHFlow's
  ``prm_evaluate.py`` and search-and-learn's ``RLHFFlow`` PRM, which read logits at ``-3`` of a
  Llama-3 conversation ending ``"\\n\\n", "+", "<|eot_id|>"``. The template pieces come from
  rendering a conversation with placeholder contents (:class:`ChatTurns`).
- ``qwen2.5-math-prm``: the chat template over a system prompt (default
  :data:`QWEN_PRM_SYSTEM_PROMPT`), the problem as user turn, and an assistant turn holding the
  steps, each followed by ``<extra_0>``: ``<template up to the assistant content> | "s1<extra_0>"^
  | "s2<extra_0>"^ | ...``; the two-class head at each ``<extra_0>``, softmax, class 1. As in the
  Qwen2.5-Math-PRM model card (``"<extra_0>".join(steps) + "<extra_0>"``, template rendered
  without a generation prompt, then ``tokenizer.encode``).
- ``skywork``: ``bos + q + "\\n" | s1 "\\n"^ | s2 "\\n"^ | ...``; the value head at the newline
  that ends each step, sigmoid. As in Skywork's ``skywork-o1-prm-inference`` ``prepare_input``
  (read through openr's copy of it): the prompt is encoded as
  ``bos_token + problem + "\\n"`` and each step is encoded *on its own* and followed by the
  newline's token id, so per-step tokenization is this format's definition, not an
  approximation. ``bos`` is the tokenizer's ``bos_token`` text, or nothing when it has none.
  The reference makes every line a step; here a step is what the strategy passes, so a step
  holding newlines is encoded line by line exactly as the reference encodes it (empty lines
  skipped, as its later copies do) and scored once, at its last newline.

Tokenization rule. A prefix is tokenized alone (with the tokenizer's special tokens where the
format's reference adds them). A Skywork step is tokenized alone, by definition. Every other
segment is tokenized as the continuation of the segment before it: ``encode(prev + seg)`` minus
the tokens of ``encode(prev)``, which must be a prefix of it (:func:`encode_after`). Segment
boundaries sit where tokenizers do not merge across (before a space that starts a word, after a
newline, at special tokens), so the ids equal those of tokenizing the whole text at once; the
continuation cancels start-of-text effects such as SentencePiece-style tokenizers' prepended
``▁``. A boundary a tokenizer does merge across is an error (:class:`FormatError`), never a
silently different sequence.

Steps are used as given (:func:`~ttscale.verifiers.base.split_steps` strips them). The ``+`` and
``-`` of the two-token formats are the tokens their texts encode to alone, which must be one
each: ``+`` for byte-level tokenizers (RLHFlow's reference takes ``encode("+")[-1]``), ``▁+`` for
SentencePiece-style ones, whose prepended ``▁`` makes that the token Math-Shepherd's reference
reads (``encode("+ -")[1:]`` on Mistral's tokenizer, by our reading).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ttscale.errors import (
    FormatError,  # re-exported here
    InvalidArgument,
)

MATH_SHEPHERD_TAG = "ки"
QWEN_PRM_STEP_TAG = "<extra_0>"
QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
SKYWORK_STEP_END = "\n"


def math_shepherd_text(question: str, steps: Sequence[str]) -> str:
    """Math-Shepherd: ``question`` then each step followed by `` ки`` and a newline; the PRM reads
    the ``+``/``-`` logits at each tag."""
    return f"{question} " + "".join(f"{step} {MATH_SHEPHERD_TAG}\n" for step in steps)


@dataclass(frozen=True)
class Segment:
    """Text and its token ids; a step's segment ends with the token its score is read at."""

    text: str
    ids: tuple[int, ...]


def encode_after(tokenizer, context: str, text: str) -> list[int]:
    """The ids of ``text`` as they appear when ``context + text`` is tokenized as one string.

    Raises :class:`FormatError` when a token spans the boundary (the tokens of ``context`` alone
    are not a prefix of those of ``context + text``).
    """
    if not context:
        return tokenizer.encode(text, add_special_tokens=False)
    before = tokenizer.encode(context, add_special_tokens=False)
    both = tokenizer.encode(context + text, add_special_tokens=False)
    if both[: len(before)] != before:
        raise FormatError(
            f"the tokenizer merges across a segment boundary: {context[-20:]!r} | {text[:20]!r}; "
            "incremental scoring cannot reproduce this format's tokens"
        )
    return both[len(before) :]


def single_token(tokenizer, name: str, text: str) -> int:
    """The one token id ``text`` encodes to (without special tokens); an error naming ``name``."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise FormatError(
            f"{name}: {text!r} is not one token of this tokenizer (it encodes to {len(ids)} "
            "tokens); the PRM's vocabulary must hold it",
            param=name,
        )
    return ids[0]


def head_tokens(tokenizer, good_token: str, bad_token: str) -> tuple[int, int]:
    """The ``+`` and ``-`` token ids a two-token format reads: one token each, and two different
    tokens (one token read as both would score every step 0.5)."""
    good = single_token(tokenizer, "good_token", good_token)
    bad = single_token(tokenizer, "bad_token", bad_token)
    if good == bad:
        raise FormatError(f"bad_token: {bad_token!r} is the same token as good_token "
                          f"{good_token!r}; a step's score reads the two against each other",
                          param="bad_token")
    return good, bad


class PRMFormat:
    """A format bound to a tokenizer: the prefix of a problem and the segment of each step."""

    name: str
    #: How the model's head reads a step: the ``kind`` of :func:`ttscale.ops.prm_step_scores`.
    kind: str
    #: Keyword options the format takes besides the tokenizer.
    options: tuple[str, ...] = ()
    #: The ``+`` and ``-`` token ids whose logits a two-token format reads.
    head_tokens: tuple[int, int] | None = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def prefix(self, question: str) -> Segment:
        raise NotImplementedError

    def step(self, step: str, index: int, previous: Segment) -> Segment:
        """Step ``index`` (0-based) following ``previous`` (the prefix or the last step)."""
        raise NotImplementedError

    def _continue(self, previous: Segment, text: str) -> Segment:
        return Segment(text, tuple(encode_after(self.tokenizer, previous.text, text)))


class MathShepherd(PRMFormat):
    name, kind = "math-shepherd", "two_token"
    options = ("step_tag", "good_token", "bad_token")

    def __init__(self, tokenizer, *, step_tag: str = MATH_SHEPHERD_TAG, good_token: str = "+",
                 bad_token: str = "-"):
        super().__init__(tokenizer)
        self.step_tag = step_tag
        self.head_tokens = head_tokens(tokenizer, good_token, bad_token)
        # The tag must be one token where it stands (after a space), or its last token would be
        # read for a fragment of it; and not a + or - token, which the model is asked to predict
        # in its place.
        tag_ids = encode_after(tokenizer, "1", f" {step_tag}")
        if not tokenizer.decode(tag_ids[-1:], skip_special_tokens=False).endswith(step_tag):
            raise FormatError(f"step_tag: {step_tag!r} is not one token of this tokenizer",
                              param="step_tag")
        if step_tag.strip() in (good_token.strip(), bad_token.strip()):
            raise FormatError(f"step_tag: {step_tag!r} is also good_token or bad_token; the tag "
                              "marks where the model predicts one of them", param="step_tag")

    def prefix(self, question):
        return Segment(question, tuple(self.tokenizer.encode(question)))

    def step(self, step, index, previous):
        opening = " " if index == 0 else "\n"
        return self._continue(previous, f"{opening}{step} {self.step_tag}")


@dataclass(frozen=True)
class ChatTurns:
    """A chat template's text between message contents, read off a rendered placeholder chat.

    ``to_assistant`` runs from the end of a user content to the start of the assistant's
    content; ``to_user`` from the end of an assistant content to the next user content.
    """

    to_assistant: str
    to_user: str


def _render(tokenizer, messages: list[dict[str, str]], fmt: str) -> str:
    if tokenizer.chat_template is None:
        raise FormatError(
            f"format: {fmt!r} renders the model's chat template, but its tokenizer_config.json "
            "has none"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=False)


def _split_on(text: str, markers: list[str], fmt: str) -> list[str]:
    """``text`` cut at each marker, which must occur once each, in order."""
    parts = []
    for marker in markers:
        if text.count(marker) != 1:
            raise FormatError(f"format: {fmt!r}: the chat template does not place each message's "
                              "content once, verbatim")
        head, text = text.split(marker)
        parts.append(head)
    return parts + [text]


# Placeholder message contents: letters only, so templates that trim or escape leave them alone.
_MARK = [f"TTSCALEPLACEHOLDER{c}" for c in "ABCD"]


class RLHFlow(PRMFormat):
    name, kind = "rlhflow", "two_token"
    options = ("good_token", "bad_token")

    def __init__(self, tokenizer, *, good_token: str = "+", bad_token: str = "-"):
        super().__init__(tokenizer)
        self.head_tokens = head_tokens(tokenizer, good_token, bad_token)
        self.answer = good_token
        chat = [{"role": "user", "content": _MARK[0]}, {"role": "assistant", "content": _MARK[1]},
                {"role": "user", "content": _MARK[2]}, {"role": "assistant", "content": _MARK[3]}]
        _, to_assistant, to_user, to_assistant_last, _ = _split_on(
            _render(tokenizer, chat, self.name), _MARK, self.name)
        if to_assistant_last != to_assistant:
            raise FormatError(f"format: {self.name!r}: the chat template renders the last turn "
                              "differently from earlier ones")
        self.turns = ChatTurns(to_assistant, to_user)

    def prefix(self, question):
        # The first user turn is question + " " + step 1; the prefix stops before the space.
        chat = [{"role": "user", "content": f"{question} {_MARK[0]}"},
                {"role": "assistant", "content": _MARK[1]}]
        head = _split_on(_render(self.tokenizer, chat, self.name), _MARK[:1], self.name)[0]
        text = head.removesuffix(" ")
        return Segment(text, tuple(self.tokenizer.encode(text, add_special_tokens=False)))

    def step(self, step, index, previous):
        opening = " " if index == 0 else self.answer + self.turns.to_user
        return self._continue(previous, opening + step + self.turns.to_assistant)


class QwenMathPRM(PRMFormat):
    name, kind = "qwen2.5-math-prm", "two_class"
    options = ("system_prompt",)

    def __init__(self, tokenizer, *, system_prompt: str = QWEN_PRM_SYSTEM_PROMPT):
        super().__init__(tokenizer)
        self.system_prompt = system_prompt
        if tokenizer.token_to_id(QWEN_PRM_STEP_TAG) is None:
            raise FormatError(f"format: {self.name!r} tags steps with {QWEN_PRM_STEP_TAG}, "
                              "which this tokenizer's vocabulary lacks")
        single_token(tokenizer, "format", QWEN_PRM_STEP_TAG)
        self.prefix("")  # fails now, not at the first problem, without a usable chat template

    def prefix(self, question):
        chat = [{"role": "system", "content": self.system_prompt},
                {"role": "user", "content": question},
                {"role": "assistant", "content": _MARK[0]}]
        text = _split_on(_render(self.tokenizer, chat, self.name), _MARK[:1], self.name)[0]
        return Segment(text, tuple(self.tokenizer.encode(text)))

    def step(self, step, index, previous):
        return self._continue(previous, step + QWEN_PRM_STEP_TAG)


class Skywork(PRMFormat):
    name, kind = "skywork", "value"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.step_end = tokenizer.encode(SKYWORK_STEP_END)[-1]

    def prefix(self, question):
        text = (self.tokenizer.bos_token or "") + question + "\n"
        return Segment(text, tuple(self.tokenizer.encode(text)))

    def step(self, step, index, previous):
        ids = []
        for line in [line for line in step.split("\n") if line] or [""]:
            ids += [*self.tokenizer.encode(line), self.step_end]
        return Segment(step + SKYWORK_STEP_END, tuple(ids))


FORMATS = {cls.name: cls for cls in (MathShepherd, RLHFlow, QwenMathPRM, Skywork)}


def check_format_options(name: str | None, **options) -> dict[str, str]:
    """The options given (not None) for format ``name``: strings, non-empty but for the system
    prompt, and options of that format (any format's when ``name`` is None: it is known later)."""
    given = {key: value for key, value in options.items() if value is not None}
    known = FORMATS[name].options if name in FORMATS else tuple(
        dict.fromkeys(option for cls in FORMATS.values() for option in cls.options))
    for key, value in given.items():
        if not isinstance(value, str):
            raise InvalidArgument(f"{key}: expected a string, got {type(value).__name__}")
        if key != "system_prompt" and not value.strip():
            raise InvalidArgument(f"{key}: expected a non-blank string, got {value!r}")
        if key not in known:
            raise InvalidArgument(f"{key}: the {name!r} format takes no {key} "
                                  f"(it takes: {', '.join(known) or 'no options'})")
    return given


def make_format(name: str, tokenizer, **options) -> PRMFormat:
    """The format ``name`` bound to ``tokenizer``; ``options`` that are None take the defaults."""
    if not isinstance(name, str) or name not in FORMATS:
        raise InvalidArgument(f"format: expected one of {', '.join(FORMATS)}, got {name!r}")
    return FORMATS[name](tokenizer, **check_format_options(name, **options))
