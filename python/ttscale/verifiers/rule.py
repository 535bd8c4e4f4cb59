"""The rule verifier: checks a path's final answer against the known one (oracle runs, tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ttscale._checks import check_function, check_real
from ttscale.errors import InvalidArgument
from ttscale.verifiers.base import Verifier, check_parents, check_steps


@dataclass(eq=False)
class _Path:
    reference: str | None
    steps: list[str] = field(default_factory=list)


class RuleVerifier(Verifier):
    """Scores a final step 1.0 when the answer it states equals the reference, else 0.0.

    Steps before the last get ``intermediate`` (default 0.5: no opinion), so search under this
    verifier is blind until answers appear, as an oracle's should be.

    Parameters
    ----------
    extract : callable, optional
        Text -> answer, default :func:`ttscale.grading.extract_answer`.
    equal : callable, optional
        (predicted, reference) -> bool, default :func:`ttscale.grading.answers_equal`.
    """

    def __init__(self, extract: Callable[[str], str | None] | None = None,
                 equal: Callable[[str | None, str], bool] | None = None, intermediate: float = 0.5):
        check_function("extract", extract)
        check_function("equal", equal)
        intermediate = check_real("intermediate", intermediate, low=0, high=1)
        if extract is None or equal is None:
            from ttscale import grading

            extract = extract or grading.extract_answer
            equal = equal or grading.answers_equal
        self.extract, self.equal, self.intermediate = extract, equal, intermediate
        self.scored_tokens = 0

    def start(self, problems, references=None):
        if isinstance(problems, str) or not isinstance(problems, Sequence):
            raise InvalidArgument(f"problems: expected a sequence of strings, got {problems!r:.60}")
        if (references is None or isinstance(references, str)
                or not isinstance(references, Sequence) or len(references) != len(problems)
                or not all(isinstance(r, str | None) for r in references)):
            raise InvalidArgument("references: the rule verifier needs one known answer (a string) "
                                  "per problem")
        return [_Path(ref) for ref in references]

    def fork(self, paths, parents):
        return [_Path(paths[p].reference, list(paths[p].steps)) for p in check_parents(paths, parents)]

    def score(self, paths: Sequence[_Path], steps, final):
        check_steps(paths, steps, final)
        scores: list[float | None] = []
        for path, step, last in zip(paths, steps, final, strict=True):
            path.steps.append(step)
            if not last:
                scores.append(self.intermediate)
                continue
            answer = self.extract("\n\n".join(path.steps))
            ok = answer is not None and path.reference is not None and self.equal(answer, path.reference)
            scores.append(1.0 if ok else 0.0)
        return scores

    def free(self, paths):
        pass
