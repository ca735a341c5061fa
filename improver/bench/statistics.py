"""The benchmark's statistics: means with t-intervals over units, the fraction of the gap closed, comparisons.

Units are (starting policy, seed) pairs; a unit is ``{"expert_return": float, "runs": {contender: [Row, ...]}}``
(plus its policy, tasks and seed). Contenders whose name starts with ``improver-`` are compared with every other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scipy import stats


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and half-width of the ``level`` t-interval (``None`` for a single value).

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("mean_ci needs at least one value")
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * sd / math.sqrt(len(values)))


def gap_closed(return_k: float, return_0: float, return_expert: float) -> float | None:
    """``(R_k - R_0) / (R_expert - R_0)``; ``None`` when the start already matches the expert."""
    gap = return_expert - return_0
    return None if gap <= 0 else (return_k - return_0) / gap


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing or ``b <= 0`` (a ratio to nothing says nothing)."""
    return None if a is None or b is None or b <= 0 else a / b


def aggregate(units: list[dict[str, Any]], contenders: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Per contender and checkpoint: mean and 95% CI over units of success, return and gap closed.

    ``gap_closed`` is the mean of the units' fractions; ``gap_closed_pooled`` is the fraction of
    the mean returns' gap. Contenders that no unit ran are left out.
    """
    table: dict[str, list[dict[str, Any]]] = {}
    for name in contenders:
        runs = [u for u in units if name in u["runs"]]
        if not runs:
            continue
        rows = []
        for k in range(len(runs[0]["runs"][name])):
            at_k = [u["runs"][name][k] for u in runs]
            gaps = [gap_closed(r["mean_return"], u["runs"][name][0]["mean_return"], u["expert_return"]) for r, u in zip(at_k, runs)]
            gaps = [g for g in gaps if g is not None]
            success, success_ci = mean_ci([r["success"] for r in at_k])
            mean_return, return_ci = mean_ci([r["mean_return"] for r in at_k])
            gap, gap_ci = mean_ci(gaps) if gaps else (None, None)
            rows.append(
                {
                    "step": at_k[0]["step"],
                    "env_steps": round(sum(r["env_steps"] for r in at_k) / len(at_k)),
                    "success": success,
                    "success_ci95": success_ci,
                    "mean_return": mean_return,
                    "mean_return_ci95": return_ci,
                    "gap_closed": gap,
                    "gap_closed_ci95": gap_ci,
                    # Of the mean returns: one unit that starts near the expert cannot swamp it, as it can the mean of ratios.
                    "gap_closed_pooled": gap_closed(
                        mean_return, mean_ci([u["runs"][name][0]["mean_return"] for u in runs])[0], mean_ci([u["expert_return"] for u in runs])[0]
                    ),
                    "wall_s": sum(r["wall_s"] for r in at_k) / len(at_k),
                }
            )
        table[name] = rows
    return table


def compare(table: dict[str, list[dict[str, Any]]], steps: int) -> list[dict[str, Any]]:
    """Improver (each mode) over each other contender at the same improvement step (same env steps)."""
    rows = []
    for mine in (n for n in table if n.startswith("improver-")):
        for other in (n for n in table if not n.startswith("improver-")):
            for k in range(1, steps + 1):
                a, b = table[mine][k], table[other][k]
                rows.append(
                    {
                        "improver": mine,
                        "vs": other,
                        "step": k,
                        "env_steps": f"{a['env_steps']} vs {b['env_steps']}",
                        "success": f"{a['success']:.3f} vs {b['success']:.3f}",
                        "success_ratio": ratio(a["success"], b["success"]),
                        "gap_closed_ratio": ratio(a["gap_closed"], b["gap_closed"]),
                    }
                )
    return rows


def ppo_to_match(table: dict[str, list[dict[str, Any]]], steps: int) -> list[dict[str, Any]]:
    """Env steps PPO needs to reach each improver mode's final success and final return."""
    if "ppo" not in table:
        return []
    ppo = table["ppo"]
    rows = []
    for mine in (n for n in table if n.startswith("improver-")):
        final, first = table[mine][steps], table[mine][0]
        for key in ("success", "mean_return"):
            if final[key] <= first[key]:
                answer = f"n/a: the improver did not raise {key} ({first[key]:.3f} -> {final[key]:.3f})"
            else:
                hit = next((r for r in ppo if r[key] >= final[key]), None)
                answer = hit["env_steps"] if hit else f"not reached within {ppo[-1]['env_steps']}"
            rows.append({"improver": mine, "metric": key, "improver_final": final[key], "improver_env_steps": final["env_steps"], "ppo_env_steps_to_match": answer})
    return rows
