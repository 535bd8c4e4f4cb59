"""From a problem's text to the policy's prompt tokens, in one place for every strategy.

With a chat template in the model's tokenizer config, the problem is the user's message (after
an optional system message) and the template adds the assistant's turn; the rendered text
carries its own special tokens, so none are added when it is tokenized. Without a template the
prompt is the problem's text (after the system prompt and a blank line, if one is given),
tokenized with the tokenizer's usual special tokens (a BOS, say).

A caller's ``prompt_fn(problem)`` replaces both: a string it returns is tokenized like plain
text, a list of ints is taken as the prompt's token ids.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

from ttscale.errors import InvalidArgument

PromptFn = Callable[[str], "str | list[int]"]


def token_id_list(value) -> list[int] | None:
    """``value`` as a list of ints when it is a list or tuple of integers (numpy's too, not
    bools); None otherwise. What a caller's function may return instead of text."""
    if isinstance(value, list | tuple) and all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value
    ):
        return [int(t) for t in value]
    return None


def build_prompt(
    tokenizer, problem: str, system_prompt: str | None = None, prompt_fn: PromptFn | None = None
) -> list[int]:
    """The prompt's token ids for one problem (see the module docstring)."""
    if prompt_fn is not None:
        prompt = prompt_fn(problem)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgument(f"prompt_fn: returned an empty prompt for {problem[:40]!r}")
            return tokenizer.encode(prompt)
        ids = token_id_list(prompt)
        if ids is None:
            raise InvalidArgument(f"prompt_fn: expected a string or a list of token ids, got "
                             f"{prompt!r:.40} for {problem[:40]!r}")
        return ids
    if tokenizer.chat_template is not None:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": problem})
        return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    text = f"{system_prompt}\n\n{problem}" if system_prompt else problem
    return tokenizer.encode(text)


def build_prompts(
    tokenizer,
    problems: Sequence[str],
    system_prompt: str | None = None,
    prompt_fn: PromptFn | None = None,
) -> list[list[int]]:
    """:func:`build_prompt` for each problem; an empty prompt is an error naming the problem."""
    prompts = []
    for i, problem in enumerate(problems):
        ids = build_prompt(tokenizer, problem, system_prompt, prompt_fn)
        if not ids:
            raise InvalidArgument(f"problems[{i}]: the prompt is empty")
        prompts.append(ids)
    return prompts
