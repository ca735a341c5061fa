"""Benchmarks: the improver against PPO, MAML and filtered BC on held-out tasks, and the cost of one step.

- :mod:`~improver.bench.protocol`: what runs (:class:`BenchConfig`, presets, starting policies) and
  :func:`run_benchmark`, which resumes an earlier run into the same folder.
- :mod:`~improver.bench.contenders`: the :class:`Contender` interface and its registry :data:`CONTENDERS`.
- :mod:`~improver.bench.statistics`: t-intervals over units, the fraction of the gap closed, comparisons.
- :mod:`~improver.bench.report`: ``results.md``, ``results.json``, plots and a console summary.
- :mod:`~improver.bench.step`: time and peak memory of one ``Improver.step`` (``improver bench step``).

The names below are imported on first use, so that the fresh process of each step measurement
loads only :mod:`~improver.bench.step`.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module (under ``improver.bench``) that defines it
_LAZY = {
    **dict.fromkeys(("BenchConfig", "MamlSettings", "Preset", "PRESETS", "Start", "load_starts", "run_benchmark", "finished_units"), "protocol"),
    **dict.fromkeys(("Contender", "CONTENDERS", "DEFAULT_CONTENDERS", "MAML_VARIANTS", "Row", "Setup", "Skipped", "evaluate", "score", "improver_rows"), "contenders"),
    **dict.fromkeys(("mean_ci", "gap_closed", "ratio", "aggregate", "compare", "ppo_to_match"), "statistics"),
    **dict.fromkeys(("write_results", "write_plots", "summary_lines"), "report"),
    **dict.fromkeys(("random_experience", "measure_step", "bench_step"), "step"),
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'improver.bench' has no attribute {name!r}") from None
    return getattr(importlib.import_module(f".{module}", __name__), name)
