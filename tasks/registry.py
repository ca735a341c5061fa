"""One registry, one way to name a suite: ``ML1:<family>``, ``ML10``, ``ML45``, ``MT10``, ``MT50``,
``toy:reach2d``, and the suites users register.

Your own task family (any Gymnasium env with a parameterised task distribution) becomes a suite
with :func:`register_suite`. For the command line (``improver generate``, ``meta-train``,
``improve``) and for ``accelerate launch`` workers to find it by name, the module that registers
it must be imported in their process too; :func:`make_suite` imports, the first time it meets an
unknown name:

- every module or ``.py`` file named in the ``IMPROVER_PLUGINS`` environment variable
  (comma-separated, e.g. ``IMPROVER_PLUGINS=my_pkg.suites,examples/reacher_suite.py``), and
- every entry point of the ``improver.suites`` group of the installed distributions (a module,
  or a function called with no arguments), e.g. in ``pyproject.toml``:
  ``[project.entry-points."improver.suites"] reacher = "my_pkg.suites"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from . import metaworld_suite, toy
from .suite import Suite

PLUGINS_VARIABLE = "IMPROVER_PLUGINS"
ENTRY_POINT_GROUP = "improver.suites"

# kind -> (builder taking (argument after the colon or None, seed), whether it needs an argument)
SUITES: dict[str, tuple[Callable[[str | None, int], Suite], bool]] = {
    "ML1": (lambda family, seed: metaworld_suite.ml_suite("ML1", family, seed), True),
    "ML10": (lambda _, seed: metaworld_suite.ml_suite("ML10", None, seed), False),
    "ML45": (lambda _, seed: metaworld_suite.ml_suite("ML45", None, seed), False),
    "MT10": (lambda _, seed: metaworld_suite.mt_suite("MT10", seed), False),
    "MT50": (lambda _, seed: metaworld_suite.mt_suite("MT50", seed), False),
    "toy": (lambda env, seed: _toy(env, seed), True),
}
BUILTIN = frozenset(SUITES)

TOY_SUITES: dict[str, Callable[[int], Suite]] = {"reach2d": toy.reach2d_suite}

_plugins_loaded = False


def _toy(env: str | None, seed: int) -> Suite:
    if env not in TOY_SUITES:
        raise ValueError(f"unknown toy suite {env!r}; choose one of {', '.join(f'toy:{k}' for k in TOY_SUITES)}")
    return TOY_SUITES[env](seed)


def register_suite(
    kind: str,
    builder: Callable[..., Suite] | None = None,
    *,
    needs_argument: bool = False,
    replace: bool = False,
) -> Callable[..., Suite] | Callable[[Callable[..., Suite]], Callable[..., Suite]]:
    """Make ``make_suite(kind)`` (or ``make_suite("kind:<argument>")``) build your suite.

    Usable as a call, ``register_suite("reacher", reacher_suite)``, or as a decorator,
    ``@register_suite("reacher")``. The suite the builder returns must carry the name it is asked
    for (``Suite.name`` and every ``Task.suite``), because saved policies, datasets and episode
    records find their tasks again through that name.

    Args:
        kind: Suite name (letters, digits, ``_``, ``-``, ``.``; no colon).
        builder: ``builder(seed) -> Suite``, or with ``needs_argument``
            ``builder(argument, seed) -> Suite`` for names ``kind:<argument>``.
        needs_argument: Whether the name takes a ``:<argument>`` part (like ``ML1:push-v3``).
        replace: Allow replacing a suite registered earlier (never a built-in one).

    Returns:
        ``builder`` (so the decorator leaves the function usable).

    Raises:
        ValueError: for a malformed name, a built-in name, or a name taken (without ``replace``).
        TypeError: if ``builder`` is not callable.
    """
    if builder is None:
        return lambda function: register_suite(kind, function, needs_argument=needs_argument, replace=replace)
    if not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", kind):
        raise ValueError(f"a suite name is letters, digits, '_', '-' or '.' with no colon; got {kind!r}")
    if not callable(builder):
        raise TypeError(f"register_suite({kind!r}, ...) needs a function returning a Suite; got {type(builder).__name__}")
    if kind in BUILTIN:
        raise ValueError(f"{kind!r} is a built-in suite; register yours under another name")
    if kind in SUITES and not replace and not _same_function(SUITES[kind][0], builder, needs_argument):
        raise ValueError(f"a suite {kind!r} is registered already; pass replace=True to replace it")
    SUITES[kind] = (builder if needs_argument else (lambda _, seed: builder(seed)), needs_argument)
    make_suite.cache_clear()  # a replaced suite must not be served from the cache
    return builder


def _same_function(registered: Callable, builder: Callable, needs_argument: bool) -> bool:
    """Whether ``builder`` is the registered one, re-imported (a plugin file imported by path and by name)."""
    if not needs_argument:  # registered wraps builder in a lambda; compare the wrapped function
        registered = next((c.cell_contents for c in registered.__closure__ or () if callable(c.cell_contents)), registered)
    def where(function: Callable) -> tuple | None:
        code = getattr(function, "__code__", None)
        return None if code is None else (function.__qualname__, code.co_filename, code.co_firstlineno)

    return registered is builder or (where(builder) is not None and where(registered) == where(builder))


def unregister_suite(kind: str) -> None:
    """Remove a suite added with :func:`register_suite` (``ValueError`` for built-in or unknown names)."""
    if kind in BUILTIN or kind not in SUITES:
        raise ValueError(f"{kind!r} is not a registered user suite; user suites are {sorted(set(SUITES) - BUILTIN)}")
    del SUITES[kind]
    make_suite.cache_clear()


def _import_plugin(spec: str) -> None:
    """Import one ``IMPROVER_PLUGINS`` entry: a module name, or the path of a ``.py`` file."""
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{PLUGINS_VARIABLE} names {spec!r}, which is not a file")
        name = "improver_plugin_" + re.sub(r"\W", "_", path.stem)
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # before exec: pickled task builders (worker processes) look it up
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    else:
        try:
            importlib.import_module(spec)
        except ImportError as err:
            raise ValueError(f"{PLUGINS_VARIABLE} names the module {spec!r}, which does not import: {err}") from err


def load_plugins(force: bool = False) -> None:
    """Import the suite plugins named by ``IMPROVER_PLUGINS`` and the ``improver.suites`` entry points.

    Runs once per process (``force`` runs it again, e.g. after changing the variable).
    """
    global _plugins_loaded
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for spec in filter(None, (s.strip() for s in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        _import_plugin(spec)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()
        if callable(loaded):
            loaded()


@lru_cache(maxsize=16)
def make_suite(name: str, seed: int = 0) -> Suite:
    """Build (and cache) the suite called ``name`` with task parameters drawn from ``seed``.

    Raises:
        ValueError: for an unknown suite or task family, a missing/extra ``:argument``, or a
            registered builder whose suite does not carry the name it was asked for.
    """
    kind, _, argument = name.partition(":")
    if kind not in SUITES:
        load_plugins()
    if kind not in SUITES:
        users = sorted(set(SUITES) - BUILTIN)
        raise ValueError(
            f"unknown suite {name!r}; suites are ML1:<task> (e.g. ML1:push-v3), ML10, ML45, MT10, MT50, toy:reach2d"
            + (f", and the registered {', '.join(users)}" if users else "")
            + f". Register your own with improver.tasks.registry.register_suite, in a module named in {PLUGINS_VARIABLE} "
            f"or an {ENTRY_POINT_GROUP!r} entry point"
        )
    builder, needs_argument = SUITES[kind]
    if needs_argument and not argument:
        raise ValueError(f"suite {kind!r} needs a task after a colon, e.g. {kind}:{'push-v3' if kind == 'ML1' else 'reach2d'}")
    if not needs_argument and argument:
        raise ValueError(f"suite {kind!r} takes no ':{argument}' part")
    suite = builder(argument or None, seed)
    if not isinstance(suite, Suite):
        raise ValueError(f"the builder of suite {kind!r} returned a {type(suite).__name__}, not an improver.tasks.Suite")
    names = {t.suite for ts in suite.splits.values() for t in ts} | {suite.name}
    if kind not in BUILTIN and names != {name}:
        raise ValueError(
            f"the builder of suite {name!r} made a suite whose names are {sorted(names)}; Suite.name and every Task.suite must be {name!r}"
        )
    return suite
