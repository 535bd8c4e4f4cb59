"""Write ``bench/math500_shapes.json``: the token lengths of MATH-500 that ``bench_search.py``
replays (numbers only, no text), from ``../shared/data/math500.jsonl``.

Per problem: the prompt's length and each reference-solution step's length, in tokens
estimated as characters / 3.5 (about what Qwen2.5's and Llama-3's tokenizers give on English
with LaTeX; no tokenizer is downloaded here), plus ``SYSTEM_TOKENS`` for the system prompt and
chat template search-and-learn puts before a problem. MATH's reference solutions are written as
paragraphs, rarely with the blank line that ends each step of a policy prompted for steps, so a
step here is a sentence or line, merged with the next until it has ``MIN_STEP_TOKENS``: about
the steps such a policy writes. Run: ``python bench/math500_shapes.py [path/to/math500.jsonl]``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

CHARS_PER_TOKEN = 3.5
SYSTEM_TOKENS = 100  # search-and-learn's system prompt ("Solve the following math problem ...")
MIN_STEP_TOKENS = 24
HERE = Path(__file__).parent
BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z$\\])|\n+")


def tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def shapes(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        steps, pending = [], 0
        for piece in BREAK.split(row["solution"]):
            if piece.strip():
                pending += tokens(piece)
                if pending >= MIN_STEP_TOKENS:
                    steps.append(pending)
                    pending = 0
        if pending and steps:
            steps[-1] += pending  # a short tail joins the last step
        elif pending:
            steps.append(pending)
        out.append({"prompt": SYSTEM_TOKENS + tokens(row["problem"]), "steps": steps or [1]})
    return out


def main() -> None:
    default = HERE.parents[1] / "shared/data/math500.jsonl"
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    table = shapes(rows)
    meta = {"source": "MATH-500 (HuggingFaceH4/MATH-500), ../shared/data/math500.jsonl",
            "chars_per_token": CHARS_PER_TOKEN, "system_tokens": SYSTEM_TOKENS,
            "min_step_tokens": MIN_STEP_TOKENS,
            "problems": len(table)}
    (HERE / "math500_shapes.json").write_text(json.dumps({"meta": meta, "problems": table}) + "\n")
    steps = [len(p["steps"]) for p in table]
    total = [sum(p["steps"]) for p in table]
    print(f"{len(table)} problems; prompt mean {sum(p['prompt'] for p in table) / len(table):.0f} "
          f"tokens; steps mean {sum(steps) / len(steps):.1f} (max {max(steps)}); solution mean "
          f"{sum(total) / len(total):.0f} tokens (max {max(total)})")


if __name__ == "__main__":
    main()
