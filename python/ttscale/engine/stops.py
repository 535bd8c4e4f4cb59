"""Step and stop detection by token id.

Tokenizers merge a delimiter into larger tokens (``".\\n\\n"``, ``"\\n\\n\\n"``), so a stop fires
on every token whose text contains the delimiter: a boolean table over the vocabulary, looked up
on the device for each sampled token. A stop string that only appears across two tokens is
caught on the host when the window's tokens are read back (:func:`find_stop`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import torch


def stop_token_table(token_texts: Sequence[str], stops: Sequence[str]) -> torch.Tensor:
    """``bool [V]``: whether token ``i``'s text contains any of ``stops``."""
    table = torch.zeros(len(token_texts), dtype=torch.bool)
    if stops:
        hits = [i for i, text in enumerate(token_texts) if any(s in text for s in stops)]
        table[hits] = True
    return table


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index in ``text`` where the earliest stop string begins at or after ``start``, or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


class TokenTexts:
    """Each token id's own text, decoded once per tokenizer and cached."""

    def __init__(self, decode_one: Callable[[int], str], vocab_size: int):
        self._decode_one = decode_one
        self.vocab_size = vocab_size

    @lru_cache(maxsize=1)  # noqa: B019  (one table per instance, kept for its life)
    def all(self) -> tuple[str, ...]:
        return tuple(self._decode_one(i) for i in range(self.vocab_size))

    @lru_cache(maxsize=64)  # noqa: B019
    def table(self, stops: tuple[str, ...]) -> torch.Tensor:
        return stop_token_table(self.all(), stops)


class StopRules:
    """Why a sequence stops at a token: the engine's stop strings (by the token table of
    :class:`TokenTexts`, and across token boundaries by the decoded tail), end-of-sequence, a
    device-side control's flag, or its length limit."""

    def __init__(self, tokenizer, eos_token_ids, vocab_size: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.texts = TokenTexts(lambda i: tokenizer.decode([i], skip_special_tokens=False),
                                vocab_size) if tokenizer is not None else None
        self.vocab_size = vocab_size
        # one row of stop tokens per set of stop strings the engine has met, for mixed steps
        self._groups: dict[tuple[str, ...], int] = {}
        self._group_rows: list[torch.Tensor] = []
        self._group_table: torch.Tensor | None = None

    def table(self, stops: tuple[str, ...]) -> torch.Tensor:
        """``bool [V]``: the tokens whose text holds a stop string (needs a tokenizer)."""
        return self.texts.table(stops)

    def group(self, stops: tuple[str, ...]) -> int:
        """The row of :meth:`group_table` for these stop strings (built once per set): the rows
        of one step index it, each by its own set."""
        if stops not in self._groups:
            row = (self.table(stops).cpu() if stops
                   else torch.zeros(self.vocab_size, dtype=torch.bool))
            self._groups[stops] = len(self._group_rows)
            self._group_rows.append(row)
            self._group_table = None
        return self._groups[stops]

    def group_table(self) -> torch.Tensor:
        """``bool [G, V]``: the stop tokens of every set :meth:`group` has numbered."""
        if self._group_table is None:
            self._group_table = torch.stack(self._group_rows)
        return self._group_table

    def in_table(self, token: int, stops) -> bool:
        return bool(stops) and bool(self.texts.table(stops)[token])

    def reason(self, seq, token: int, flagged: int, stops, limit: int) -> str | None:
        """Why ``seq`` stops at ``token``, its last token (``flagged`` on the device: a stop or
        EOS token, or a confidence stop, :mod:`ttscale.engine.confidence`), or None."""
        from ttscale.engine.confidence import TOKEN_STOP

        if flagged and not flagged & TOKEN_STOP:
            return "confidence"
        if flagged:
            return "eos" if token in self.eos_token_ids and not self.in_table(token, stops) else "stop"
        if stops:
            # A stop string split across tokens: look for one ending inside this token's text,
            # in the text after the prompt (tokens[0] is the prompt's last token). A token has a
            # character or more (8 spare for byte pieces), so the longest stop string fits.
            longest = max(map(len, stops))
            tail = self.tokenizer.decode(seq.tokens[max(1, len(seq.tokens) - longest - 8):],
                                         skip_special_tokens=False)
            start = len(tail) - len(self.texts.all()[token]) - longest + 1
            if find_stop(tail, stops, max(0, start)) is not None:
                return "stop"
        if seq.generated >= limit:
            return "length"
        return None

    def take_window(self, seq, tokens, logprobs, top, stopped, stops, limit) -> tuple[int, int]:
        """Append a window's samples to ``seq`` up to the first stop (whose reason becomes its
        ``finish_reason``; the stopping token stays pending). Returns the tokens taken and the
        tokens the window fed into the KV cache (the pending token and all taken but the last)."""
        n = len(tokens)
        if not stops and not any(stopped) and seq.generated + n < limit:
            # Nothing can stop inside this window (no stop strings, no flagged token, the limit
            # beyond it): take it whole, without a Python step per token.
            start = len(seq.tokens)
            seq.tokens.extend(tokens)
            seq.sampled_at.extend(range(start, start + n))
            seq.logprobs.extend(logprobs)
            if top is not None:
                seq.top_logprobs.extend(top)
            return n, n
        for j, token in enumerate(tokens):
            seq.tokens.append(token)
            seq.sampled_at.append(len(seq.tokens) - 1)
            seq.logprobs.append(logprobs[j])
            if top is not None:
                seq.top_logprobs.append(top[j])
            reason = self.reason(seq, token, stopped[j], stops, limit)
            if reason is not None:
                seq.finish_reason = reason
                return j + 1, j + 1
        return n, n
