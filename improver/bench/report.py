"""The benchmark's outputs: ``results.md``, ``results.json``, two plots and a console summary, all from the results dict.

Everything here reads the dict :func:`improver.bench.run_benchmark` returns (the contents of
``results.json``), so results of a run cut short, or of an older run, can be reported again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..io import atomic_path
from ..tasks.evaluation import format_table


def _plot(table: dict[str, list[dict[str, Any]]], steps: int, x: str, path: Path, title: str) -> None:
    # A bare Figure, not pyplot: no global backend or figure list to touch; imported here, as only plotting needs it.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8))
    axes = figure.subplots(1, 2)
    for i, (name, rows) in enumerate(table.items()):
        shown = rows if x == "step" else [r for r in rows if r["env_steps"] > 0]
        xs = [r[x] for r in shown]
        for axis, key in zip(axes, ("success", "mean_return")):
            ys = [r[key] for r in shown]
            axis.plot(xs, ys, "o-", color=f"C{i}", label=name, ms=3)
            cis = [r[f"{key}_ci95"] for r in shown]
            if all(c is not None for c in cis):
                axis.fill_between(xs, [y - c for y, c in zip(ys, cis)], [y + c for y, c in zip(ys, cis)], color=f"C{i}", alpha=0.15)
    start = next(iter(table.values()))[0]
    for axis, key, label in zip(axes, ("success", "mean_return"), ("success rate", "mean return")):
        if x == "env_steps":
            axis.set_xscale("log")
            axis.axhline(start[key], color="0.5", ls="--", lw=1, label="starting policies")
        axis.set(xlabel="improvement step" if x == "step" else "env steps learned from (log)", ylabel=label)
    if x == "step":
        axes[0].set_xticks(range(steps + 1))
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=7, loc="upper left")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Write ``success_vs_step.png`` and ``success_vs_env_steps.png`` (log x, with PPO's longer run) from a results dict."""
    c, table = results["config"], results["table"]
    units = results["per_unit"]
    title = f"{c['suite']} held-out, {len({u['policy'] for u in units})} policies x {len({u['seed'] for u in units})} seeds, {c['episodes']} episodes per step"
    paths = [out / "success_vs_step.png", out / "success_vs_env_steps.png"]
    _plot({n: rows[: c["steps"] + 1] for n, rows in table.items()}, c["steps"], "step", paths[0], title)
    _plot(table, c["steps"], "env_steps", paths[1], title)
    return paths


def _markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    summary = (
        f"{results['units']} units (starting policy x seed; {len(results['policies'])} policies x {c['seeds']} seeds asked), {c['steps']} improvement steps of "
        f"{c['episodes']} episodes ({results['budget_per_step']} env steps per step per policy). Mean over units, 95% t-interval "
        f"(`*_ci95`, half-width). Env steps: experience learned from; the evaluation episodes of baselines are not counted. "
        f"Wall time per unit in seconds. reward_function_version: {', '.join(results['reward_function_versions'])}. Total wall time "
        f"{results['wall_time_s']:.0f} s."
    )
    lines = [f"# Held-out benchmark: {c['suite']}", "", summary, ""]
    for name, rows in results["table"].items():
        lines += [f"## {name}", "", format_table([{k: ("-" if v is None else v) for k, v in r.items()} for r in rows]), ""]
    if results["comparison"]:
        lines += ["## Improver vs. each contender at equal env steps", "", format_table([{k: ("-" if v is None else v) for k, v in r.items()} for r in results["comparison"]]), ""]
    if results["ppo_to_match"]:
        lines += ["## Env steps PPO needs to match the improver's final figures", "", format_table(results["ppo_to_match"]), ""]
    lines += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: Path) -> None:
    """Write ``out/results.md`` and ``out/results.json`` (atomically) and, once ``results["complete"]``, the plots."""
    if results["complete"]:  # plotting costs seconds; a run cut short can be plotted with write_plots(results.json's dict, out)
        write_plots(results, out)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(_markdown(results))
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=str))


def summary_lines(results: dict[str, Any]) -> Iterator[str]:
    """Lines of a short console summary: final success and return per contender."""
    steps = results["config"]["steps"]
    rows = [
        {"contender": n, "env_steps": r[steps]["env_steps"], "success_0": r[0]["success"], "success": r[steps]["success"], "mean_return": r[steps]["mean_return"], "gap_closed": r[steps]["gap_closed"] if r[steps]["gap_closed"] is not None else "-"}
        for n, r in results["table"].items()
    ]
    yield format_table(rows)
    for r in results["ppo_to_match"]:
        yield f"PPO to match {r['improver']} final {r['metric']}: {r['ppo_env_steps_to_match']}"
