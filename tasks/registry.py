"""One registry, one way to name a suite: ``ML1:<family>``, ``ML10``, ``ML45``, ``MT10``, ``MT50``, ``toy:reach2d``."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

from . import metaworld_suite, toy
from .suite import Suite

# kind -> (builder taking (argument after the colon or None, seed), whether it needs an argument)
SUITES: dict[str, tuple[Callable[[str | None, int], Suite], bool]] = {
    "ML1": (lambda family, seed: metaworld_suite.ml_suite("ML1", family, seed), True),
    "ML10": (lambda _, seed: metaworld_suite.ml_suite("ML10", None, seed), False),
    "ML45": (lambda _, seed: metaworld_suite.ml_suite("ML45", None, seed), False),
    "MT10": (lambda _, seed: metaworld_suite.mt_suite("MT10", seed), False),
    "MT50": (lambda _, seed: metaworld_suite.mt_suite("MT50", seed), False),
    "toy": (lambda env, seed: _toy(env, seed), True),
}

TOY_SUITES: dict[str, Callable[[int], Suite]] = {"reach2d": toy.reach2d_suite}


def _toy(env: str | None, seed: int) -> Suite:
    if env not in TOY_SUITES:
        raise ValueError(f"unknown toy suite {env!r}; choose one of {', '.join(f'toy:{k}' for k in TOY_SUITES)}")
    return TOY_SUITES[env](seed)


@lru_cache(maxsize=16)
def make_suite(name: str, seed: int = 0) -> Suite:
    """Build (and cache) the suite called ``name`` with task parameters drawn from ``seed``.

    Raises:
        ValueError: for an unknown suite or task family, or a missing/extra ``:argument``.
    """
    kind, _, argument = name.partition(":")
    if kind not in SUITES:
        raise ValueError(
            f"unknown suite {name!r}; suites are ML1:<task> (e.g. ML1:push-v3), ML10, ML45, MT10, MT50, toy:reach2d"
        )
    builder, needs_argument = SUITES[kind]
    if needs_argument and not argument:
        raise ValueError(f"suite {kind!r} needs a task after a colon, e.g. {kind}:{'push-v3' if kind == 'ML1' else 'reach2d'}")
    if not needs_argument and argument:
        raise ValueError(f"suite {kind!r} takes no ':{argument}' part")
    return builder(argument or None, seed)
