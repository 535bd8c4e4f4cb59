"""Every strategy, declared once.

A strategy is a module of :mod:`ttscale.search` with an options dataclass and one decorated
function, the search itself::

    @dataclass(frozen=True)
    class BeamOptions(Options):
        beam_width: int = option(4, "Children per kept beam; divides ``n``.", metavar="M")
        max_iterations: int = option(40, "Steps searched at most.", metavar="I")

    @strategy(BeamOptions, needs_verifier=True, budget="Beams per problem.")
    def beam_search(inputs: Inputs, n: int, options: BeamOptions) -> list[SearchResult]:
        \"\"\"Search step by step ...\"\"\"

:func:`strategy` turns it into the public function, ``ttscale.beam_search(llm, problems, n,
verifier=None, sampling=None, *, beam_width=4, max_iterations=40, select=None, ...)``: it checks
the options (each error names the option), checks the common arguments and builds the prompts
(:func:`ttscale.search.common.prepare`), then calls the search. Its docstring and signature are
assembled from the declaration. The declaration is all that the rest of ttscale reads:
``ttscale run --strategy`` and its flags, ``ttscale demo --strategies``, the server's
``{"ttscale": {"strategy": ...}}`` and compute-optimal's menu. Adding a strategy is adding its
module (the registry imports every module of the package the first time it is asked).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import numbers
import pkgutil
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ttscale.errors import InvalidArgument
from ttscale.search.select import SELECTIONS

KINDS = ("int", "float", "choice", "function", "any")  # "any": documented, checked by its user


def option(default: Any = dataclasses.MISSING, doc: str = "", *, kind: str = "int",
           low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False,
           metavar: str | None = None, flag: bool = True, label: str | None = None,
           choices: Sequence[str] = ()) -> Any:
    """A field of an options dataclass: its default (none: the caller must give it), what it
    means, its kind (``"int"``, ``"float"``, ``"function"`` or ``"any"``) and range (``low``
    inclusive unless ``low_open``, ``high`` inclusive unless ``high_open``; ints default to
    ``low=1``; a ``"choice"`` is one of the strings ``choices``); ``flag`` says
    whether ``ttscale run`` offers it (``--name-with-dashes``, showing ``metavar``); ``label`` is
    the type its documentation shows (default: the kind)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if kind == "int" and low is None:
        low = 1
    if (kind == "choice") != bool(choices):
        raise ValueError("choices: expected with kind='choice' only")
    label = label or {"function": "callable, optional",
                      "choice": "{" + ", ".join(f'"{c}"' for c in choices) + "}"}.get(kind, kind)
    meta = dict(doc=doc, kind=kind, low=low, high=high, low_open=low_open, high_open=high_open,
                metavar=metavar, choices=tuple(choices),
                flag=flag and kind in ("int", "float", "choice"), label=label)
    return dataclasses.field(default=default, metadata=meta)


def check_option(name: str, value: Any, meta: dict[str, Any]) -> Any:
    """``value`` if it is of the option's kind and in its range, else InvalidArgument naming
    ``name``. Types are checked, not coerced: a bool is not a number, a string is not either."""
    kind, low, high = meta["kind"], meta["low"], meta["high"]
    if kind == "any":
        return value
    if kind == "function":
        if value is not None and not callable(value):
            raise InvalidArgument(f"{name}: expected a function, got {type(value).__name__}",
                                  param=name)
        return value
    if kind == "choice":
        if not isinstance(value, str) or value not in meta["choices"]:
            raise InvalidArgument(f"{name}: expected one of {', '.join(meta['choices'])}, got "
                                  f"{value!r}", param=name)
        return str(value)
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (integral if kind == "int" else real and math.isfinite(value)):
        raise InvalidArgument(f"{name}: expected {'an integer' if kind == 'int' else 'a number'}"
                              f"{describe_range(meta)}, got {value!r}", param=name)
    above = low is None or (value > low if meta["low_open"] else value >= low)
    below = high is None or (value < high if meta["high_open"] else value <= high)
    if not (above and below):
        raise InvalidArgument(f"{name}: expected a value{describe_range(meta)}, got {value!r}",
                              param=name)
    return int(value) if kind == "int" else float(value)


def describe_range(meta: dict[str, Any]) -> str:
    low, high = meta["low"], meta["high"]
    if high is not None:
        left, right = "(" if meta["low_open"] else "[", ")" if meta["high_open"] else "]"
        return f" in {left}{low}, {high}{right}"
    return "" if low is None else f" {'>' if meta['low_open'] else '>='} {low}"


@dataclass(frozen=True)
class Options:
    """A strategy's own knobs (none here); subclasses add fields made with :func:`option`.
    Every field is checked when the object is made; :meth:`check` adds what depends on ``n``."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.default is None:  # an option that is off by default
                continue
            object.__setattr__(self, field.name, check_option(field.name, value, field.metadata))

    def check(self, n: int) -> None:
        """Checks that involve the budget ``n`` (InvalidArgument naming the option)."""

    @classmethod
    def for_budget(cls, n: int) -> dict[str, Any]:
        """Options that suit budget ``n`` where the defaults would not (the demo's settings)."""
        return {}

    @classmethod
    def variants(cls, n: int) -> dict[str, dict[str, Any]]:
        """The demo's rows of this strategy at budget ``n``: a suffix of the row's name -> its
        options (default one row, named after the strategy, with :meth:`for_budget`)."""
        return {"": cls.for_budget(n)}


@dataclass(frozen=True)
class Strategy:
    """One registered strategy."""

    name: str
    function: Callable[..., Any]  # the public function
    options: type[Options]
    needs_verifier: bool
    budget: str  # what ``n`` counts
    summary: str  # the first line of its docstring
    positional: tuple[str, ...] = ()  # options also taken by position after ``n``
    menu: bool = False  # among compute-optimal's options

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def flag_fields(self) -> list[dataclasses.Field]:
        """The options a command line or a request body can set (numbers and choices, not
        functions)."""
        return [f for f in dataclasses.fields(self.options) if f.metadata["flag"]]

    def required(self) -> tuple[str, ...]:
        """Options without a default: every call names them."""
        return tuple(f.name for f in dataclasses.fields(self.options)
                     if f.default is dataclasses.MISSING)


_REGISTRY: dict[str, Strategy] = {}
_LOADED = False


def strategies() -> dict[str, Strategy]:
    """Every registered strategy by name, in alphabetical order (its modules imported once)."""
    global _LOADED
    if not _LOADED:
        import ttscale.search as package

        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
        _LOADED = True
    return dict(sorted(_REGISTRY.items()))


def get(name: str, param: str = "strategy") -> Strategy:
    """The strategy called ``name``; an unknown one is an InvalidArgument naming ``param``."""
    known = strategies()
    if not isinstance(name, str) or name not in known:
        raise InvalidArgument(f"{param}: unknown strategy {name!r}; choose from "
                              f"{', '.join(known)}", param=param)
    return known[name]


def strategy(options: type[Options] = Options, *, budget: str, needs_verifier: bool = False,
             selections: Sequence[str] = SELECTIONS, positional: Sequence[str] = (),
             menu: bool = False, name: str | None = None):
    """Register ``search(inputs, n, options) -> list[SearchResult]`` and return the public
    function built around it (see the module docstring). ``budget`` documents ``n``;
    ``selections`` are the ``select`` values it knows; ``positional`` options may also be passed
    by position after ``n``; ``menu`` offers it to :func:`ttscale.compute_optimal`."""
    from ttscale.search.common import COMMON, prepare

    def register(search: Callable[..., Any]) -> Callable[..., Any]:
        key = name or search.__name__
        if key in _REGISTRY:
            raise ValueError(f"strategy {key!r} is declared twice")
        fields = {f.name: f for f in dataclasses.fields(options)}
        clash = set(fields) & {f.name for f in dataclasses.fields(COMMON)}
        if clash or not set(positional) <= set(fields):
            raise ValueError(f"{key}: options {sorted(clash) or list(positional)} clash with the "
                             "common ones or are not declared")
        signature = _signature(fields, positional)

        def public(*args, **kwargs):
            for keyword in kwargs:
                if keyword not in signature.parameters:
                    raise InvalidArgument(
                        f"{keyword}: not an option of {key}; its own options are "
                        f"{', '.join(fields) or 'none'} (the common ones are in help({key}))",
                        param=keyword)
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as error:  # a missing or surplus argument
                named = re.search(r"'(\w+)'", str(error))  # "missing a required argument: 'x'"
                param = named[1] if named else "n"  # else too many positional arguments
                raise InvalidArgument(f"{param}: {error}", param=param) from None
            bound.apply_defaults()
            values = bound.arguments
            chosen = options(**{f: values[f] for f in fields})
            n = _budget(values["n"])  # an int from here on (a numpy integer passes too)
            chosen.check(n)
            common = {f.name: values[f.name] for f in dataclasses.fields(COMMON)}
            inputs = prepare(key, values["llm"], values["problems"], n,
                             values["verifier"], values["sampling"], needs_verifier=needs_verifier,
                             selections=selections, **common)
            return search(inputs, n, chosen)

        public.__name__ = public.__qualname__ = key
        public.__module__ = search.__module__
        public.__signature__ = signature
        public.__doc__ = _docstring(search.__doc__ or "", budget, fields, positional)
        public.__wrapped_search__ = search
        summary = (search.__doc__ or key).strip().splitlines()[0]
        _REGISTRY[key] = Strategy(key, public, options, needs_verifier, budget, summary,
                                  tuple(positional), menu)
        return public

    return register


def _budget(n: Any) -> int:
    from ttscale.search.common import check_count

    return check_count("n", n)


def _signature(fields: dict[str, dataclasses.Field],
               positional: Sequence[str]) -> inspect.Signature:
    from ttscale.search.common import COMMON

    P = inspect.Parameter

    def parameter(field: dataclasses.Field, kind) -> inspect.Parameter:
        default = P.empty if field.default is dataclasses.MISSING else field.default
        return P(field.name, kind, default=default)

    head = [P(n, P.POSITIONAL_OR_KEYWORD) for n in ("llm", "problems", "n")]
    head += [parameter(fields[n], P.POSITIONAL_OR_KEYWORD) for n in positional]
    head += [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in ("verifier", "sampling")]
    own = [parameter(f, P.KEYWORD_ONLY) for n, f in fields.items() if n not in positional]
    common = [parameter(f, P.KEYWORD_ONLY) for f in dataclasses.fields(COMMON)]
    return inspect.Signature([*head, *own, *common])


def _field_docs(fields: Sequence[dataclasses.Field], indent: str) -> list[str]:
    lines = []
    for field in fields:
        lines.append(f"{indent}{field.name} : {field.metadata['label']}")
        lines += [f"{indent}    {line}" for line in field.metadata["doc"].splitlines()]
    return lines


def _docstring(doc: str, budget: str, fields: dict[str, dataclasses.Field],
               positional: Sequence[str]) -> str:
    """The search's docstring (what it does, then ``Returns`` notes after a line ``Returns:``)
    with every parameter documented from the declarations."""
    from ttscale.search.common import COMMON, COMMON_HEAD, COMMON_RETURNS, COMMON_VERIFIER_SAMPLING

    text = inspect.cleandoc(doc)
    body, _, returns = text.partition("\nReturns:\n")
    lines = [body.rstrip(), "", "Parameters", "----------", COMMON_HEAD.rstrip()]
    lines += ["n : int", f"    {budget}"]
    lines += _field_docs([fields[n] for n in positional], "")
    lines += [COMMON_VERIFIER_SAMPLING]
    lines += _field_docs([f for n, f in fields.items() if n not in positional], "")
    lines += _field_docs(dataclasses.fields(COMMON), "")
    lines += ["", "Returns", "-------", COMMON_RETURNS.rstrip()]
    lines += [f"    {line}" if line else "" for line in returns.strip().splitlines()]
    return "\n".join(lines) + "\n"
