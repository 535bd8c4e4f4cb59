"""Compute-optimal's menu and table: the options it chooses among and what it chose.

An option is a strategy declared with ``menu=True`` (:func:`menu`) or, along the sequential
axis, ``"revisions-<sequential>"``: :func:`ttscale.revisions` with chains of that many
attempts. :func:`run_option` searches problems with one of them at one N, as both fitting and
searching do. :class:`ComputeOptimalTable` is the plan a fit leaves: the pilot-score edges of the
difficulty bins and each bin's chosen (option, N); :func:`pilot_score` places a problem in it.
How the table is fitted and used is :mod:`ttscale.search.compute_optimal`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ttscale.errors import InvalidArgument
from ttscale.sampling_params import SamplingParams
from ttscale.search import registry
from ttscale.search.result import Candidate, SearchResult
from ttscale.search.revisions import revisions
from ttscale.verifiers.base import Verifier

REVISIONS_PREFIX = "revisions-"  # an option "revisions-<sequential>"


def menu() -> dict[str, registry.Strategy]:
    """The strategies compute-optimal chooses among (declared with ``menu=True``), by name."""
    return {name: spec for name, spec in registry.strategies().items() if spec.menu}


def _sequential(name: str) -> int | None:
    """The attempts per chain of a ``"revisions-<sequential>"`` option; None for a strategy."""
    return int(name.removeprefix(REVISIONS_PREFIX)) if name.startswith(REVISIONS_PREFIX) else None


def _knobs(spec: registry.Strategy, **knobs) -> dict[str, Any]:
    """Of compute-optimal's knobs, those ``spec`` takes."""
    return {k: v for k, v in knobs.items() if k in spec.option_names}


def fits(name: str, n: int, **knobs) -> bool:
    """Whether option ``name`` runs at budget ``n`` with these knobs (a beam width, or a
    revisions option's attempts per chain, divides it)."""
    sequential = _sequential(name)
    if sequential is not None:
        return n % sequential == 0
    spec = menu()[name]
    try:
        spec.options(**_knobs(spec, **knobs)).check(n)
    except InvalidArgument:
        return False
    return True


def run_option(
    name: str,
    llm,
    problems: Sequence[str],
    n: int,
    verifier: Verifier,
    sampling: SamplingParams | None,
    *,
    beam_width: int,
    max_iterations: int,
    window: int,
    **shared,
) -> list[SearchResult]:
    """Search ``problems`` with one option: a strategy by name, or ``"revisions-<sequential>"``."""
    sequential = _sequential(name)
    if sequential is not None:
        return revisions(llm, problems, n, sequential, verifier, sampling, window=window, **shared)
    spec = menu()[name]
    knobs = _knobs(spec, beam_width=beam_width, max_iterations=max_iterations)
    return spec.function(llm, problems, n, verifier, sampling, **knobs, **shared)


@dataclass
class ComputeOptimalTable:
    """What :func:`fit_compute_optimal` measured and chose.

    Attributes
    ----------
    edges : list of float
        Ascending pilot scores separating the bins: bin ``b`` holds scores from ``edges[b - 1]``
        (inclusive) up to ``edges[b]``; bin 0 is the hardest.
    choices : list of (str, int)
        The chosen (strategy, N) of each bin; a strategy ``"revisions-<sequential>"`` is
        :func:`ttscale.revisions` with that many attempts per chain.
    accuracy : dict
        ``"strategy:N"`` -> accuracy per bin on the calibration set (None for an empty bin).
    counts : list of int
        Calibration problems per bin.
    pilot_n, budget : int
        Pilot samples per problem, and the largest N measured.
    window : int
        The revisions' window.
    """

    edges: list[float]
    choices: list[tuple[str, int]]
    accuracy: dict[str, list[float | None]] = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)
    pilot_n: int = 4
    budget: int = 16
    window: int = 3

    def bin_of(self, pilot_score: float) -> int:
        """The bin of a problem whose pilot scored ``pilot_score``."""
        return sum(pilot_score >= edge for edge in self.edges)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """The table the choices were made from, for a person: accuracy of every option per
        bin (the chosen one starred), and the bins' pilot-score ranges and sizes."""
        bounds = ["-inf", *(f"{edge:.3g}" for edge in self.edges), "inf"]
        bins = [
            f"bin {b} [{bounds[b]}, {bounds[b + 1]}) n={count}"
            for b, count in enumerate(self.counts)
        ]
        rows = [["option", *bins]]
        for option, accuracy in self.accuracy.items():
            name, n = option.rsplit(":", 1)
            cells = [
                ("-" if a is None else f"{a:.3f}")
                + ("*" if self.choices[b] == (name, int(n)) else "")
                for b, a in enumerate(accuracy)
            ]
            rows.append([option, *cells])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"* the bin's choice; pilot of {self.pilot_n} best-of-N samples, budget {self.budget}"
        )
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComputeOptimalTable:
        return cls(**{**data, "choices": [tuple(c) for c in data["choices"]]})


def pilot_score(candidates: Sequence[Candidate]) -> float:
    """The mean aggregate score of pilot samples (0 for samples without one)."""
    return sum(c.score or 0.0 for c in candidates) / max(len(candidates), 1)
