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
