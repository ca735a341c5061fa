"""The held-out benchmark (``improver bench improve``): the improver against PPO, MAML and filtered BC.

Protocol (Meta-World's conventions; see ``BenchConfig`` for the knobs):

- Every contender starts from the same saved lesser policies, each on its own held-out task (the
  task its record names), and per improvement step learns from ``episodes`` episodes' worth of
  env steps: the improver and the baselines alike.
- Checkpoint ``k`` of every contender is scored on the same ``episodes`` deterministic episodes
  (tasks and reset seeds of the improver's step-``k`` experience, ``seed + k``); an episode
  succeeds if its success flag is set at any step. For the improver those episodes are also the
  experience of its next step; for the others they are extra and not counted as env steps.
- PPO also runs on, to ``max(ppo_multipliers)`` times the improver's whole budget, to report
  how many env steps it needs to reach the improver's final success and return.
- Units are (starting policy, seed) pairs; tables give their mean with a 95% t-interval.
  The fraction of the gap closed is ``(R_k - R_0) / (R_expert - R_0)`` per unit, with ``R_expert``
  the suite's scripted expert on the same episodes.
- ``results.json`` is rewritten after every unit; running again into the same folder with the same
  settings resumes after the finished units (asking for more seeds or policies adds units).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from .baselines import Checkpoint
from .io import atomic_path
from .saved_files import read_json_object
from .loop import improvement_loop
from .loop_settings import RENAMED, LoopSettings
from .operator import Improver
from .policies import load_policy
from .tasks import Suite, Task, make_suite, rollout
from .tasks.evaluation import format_table, spread

CONTENDERS = ("improver-behaviour", "improver-parameters", "ppo", "maml", "bc")
"""Every contender the benchmark knows, in table order."""

PPO_GRID = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
"""Multiples of the improver's whole budget at which PPO's longer run is scored (up to the largest asked)."""


@dataclass(frozen=True)
class MamlSettings:
    """Meta-training size of the MAML baseline (see :func:`improver.baselines.maml.meta_train_maml`)."""

    examples: int = 16
    """Train examples (lesser policy on its train task) meta-trained on."""
    episodes: int = 4
    """Exploring episodes collected per example for the inner loop."""
    iterations: int = 100
    """Outer (Adam) iterations."""
    inner_steps: int = 5
    """Gradient steps of the adaptation."""
    outer_lr: float = 3e-2
    """Adam learning rate of the step sizes and temperature (3e-3 barely moved them in 100 iterations)."""
    first_order: bool = False
    """Drop second derivatives (cheaper; off: the inner loop is small enough for full MAML)."""


@dataclass(frozen=True)
class Preset:
    """A benchmark size. ``tiny`` is the CI test; the others are benchmark commands."""

    steps: int
    """Improvement steps."""
    episodes: int
    """Episodes per improvement step: the env-step budget of every contender's step."""
    seeds: int
    """Seeds per starting policy."""
    ppo_multipliers: tuple[int, ...]
    """PPO's longer run, in multiples of the improver's whole budget (it runs to the largest)."""
    policies: int | None
    """Starting policies used (``None``: all in the folder)."""
    maml: MamlSettings
    """Meta-training size of the MAML baseline."""


PRESETS: dict[str, Preset] = {
    "tiny": Preset(2, 2, 1, (1, 2), 2, MamlSettings(examples=4, episodes=2, iterations=10, inner_steps=2)),
    "small": Preset(3, 10, 2, (1, 10), None, MamlSettings()),
    "full": Preset(5, 10, 3, (1, 10, 100), None, MamlSettings(examples=40, episodes=10, iterations=300)),
}


@dataclass
class BenchConfig:
    """What to run. Fields left ``None`` take the preset's value (see :class:`Preset`)."""

    suite: str = "ML1:reach-v3"
    """Suite whose held-out (test) tasks are benchmarked on."""
    improver: Path = Path("pretrained/reach-v3/improver")
    """Folder of a trained improver."""
    policies: Path = Path("pretrained/reach-v3/lesser")
    """Folder of saved starting policies."""
    data: Path | None = None
    """Train dataset the MAML baseline is meta-trained on (``None``: MAML is skipped, and the results say so)."""
    preset: str = "small"
    """One of :data:`PRESETS`."""
    steps: int | None = None
    episodes: int | None = None
    seeds: int | None = None
    ppo_multipliers: tuple[int, ...] | None = None
    max_policies: int | None = None
    contenders: tuple[str, ...] = CONTENDERS
    """Subset of :data:`CONTENDERS` to run."""
    noise: float = 0.3
    """Gaussian exploration noise of the episodes the improver, BC and MAML learn from (the protocol's, the same
    for every contender: not the improver's ``loop_settings.exploration``)."""
    task_exploration: float | None = None
    """improver-behaviour only: std (task-parameter units) of the per-episode offset of the task it acts on (see improver.loop.TaskSampling);
    default: the improver's (its ``loop_settings``)."""
    wide_task_exploration: float | None = None
    """improver-behaviour only: that offset's std after a step whose episodes all failed (0: ``task_exploration``);
    default: the improver's."""
    memory: int | None = None
    """Improver contenders: each step watches the episodes of the last this many steps; default: the improver's."""
    maml: MamlSettings | None = None
    maml_update: Path | None = None
    """A MAML update saved by an earlier run (``OUT/maml_update``) to use instead of meta-training one."""
    suite_seed: int = 0
    """Seed the suite's task parameters are drawn with (the starting policies' records must agree)."""
    ppo_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of SB3's ``PPO``."""

    def with_loop_settings(self, settings: LoopSettings) -> BenchConfig:
        """A copy whose loop settings left ``None`` are those of ``settings`` (in behaviour mode), checked."""
        chosen = settings.overridden("behaviour", None, self.task_exploration, self.wide_task_exploration, self.memory)
        return replace(self, task_exploration=chosen.task_exploration, wide_task_exploration=chosen.wide_task_exploration, memory=chosen.memory)

    def resolved(self) -> BenchConfig:
        """A copy with the preset's values filled in and every field checked (the loop settings: see :meth:`with_loop_settings`)."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        p = PRESETS[self.preset]
        c = BenchConfig(**{**asdict(self), "maml": self.maml})
        c.steps = p.steps if c.steps is None else c.steps
        c.episodes = p.episodes if c.episodes is None else c.episodes
        c.seeds = p.seeds if c.seeds is None else c.seeds
        c.ppo_multipliers = tuple(p.ppo_multipliers if c.ppo_multipliers is None else c.ppo_multipliers)
        c.max_policies = p.policies if c.max_policies is None else c.max_policies
        c.maml = p.maml if c.maml is None else c.maml
        for name in ("steps", "episodes", "seeds"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(c, name)}")
        if not c.ppo_multipliers or min(c.ppo_multipliers) < 1:
            raise ValueError(f"ppo multipliers must be at least 1; got {c.ppo_multipliers}")
        unknown = set(c.contenders) - set(CONTENDERS)
        if unknown or not c.contenders:
            raise ValueError(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
        return c


# --- starting policies -------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """A starting policy and the held-out tasks it is improved on."""

    name: str
    policy: nn.Module
    tasks: tuple[Task, ...]


def load_starts(folder: Path, suite: Suite, limit: int | None = None) -> list[Start]:
    """The saved policies in ``folder``'s subfolders, each with the held-out task its record names.

    A policy whose record names no task is run on all of the suite's held-out tasks.

    Raises:
        FileNotFoundError: ``folder`` holds no saved policy.
        ValueError: a policy's sizes differ from the suite's, or its record names another
            suite or a task that is not held out.
    """
    folders = sorted(p for p in folder.iterdir() if (p / "config.json").is_file()) if folder.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{folder} holds no saved policies (subfolders written by improver.policies.save_policy)")
    starts = []
    for path in folders[:limit]:
        policy, record = load_policy(path)
        config = getattr(policy, "config", {})
        if (config.get("obs_dim"), config.get("act_dim")) != (suite.observation_dim, suite.action_dim):
            raise ValueError(
                f"{path}: the policy maps {config.get('obs_dim')} observations to {config.get('act_dim')} actions; "
                f"{suite.name} has {suite.observation_dim} and {suite.action_dim}"
            )
        if "index" in record:
            if record.get("suite") != suite.name or record.get("split") != "test" or record.get("suite_seed", suite.seed) != suite.seed:
                raise ValueError(
                    f"{path}: its record names task {record.get('index')} of {record.get('suite')!r} [{record.get('split')}] "
                    f"with suite seed {record.get('suite_seed')}; the benchmark runs on {suite.name!r} held-out (test) tasks, suite seed {suite.seed}"
                )
            tasks: tuple[Task, ...] = (suite.tasks("test")[record["index"]],)
        else:
            tasks = suite.tasks("test")
        starts.append(Start(path.name, policy, tasks))
    return starts


# --- statistics --------------------------------------------------------------------------------


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and half-width of the ``level`` t-interval (``None`` for a single value)."""
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


# --- running the contenders --------------------------------------------------------------------


def _evaluate(policy: Any, tasks: Sequence[Task], episodes: int, seed: int) -> tuple[float, float]:
    traj = rollout(policy, spread(tasks, episodes), 1, seed=seed, progress=False)
    return float(traj.success.float().mean()), float(traj.returns.mean())


def _scored(
    checkpoints: Iterable[Checkpoint], tasks: Sequence[Task], episodes: int, seed: int, steps: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Score each checkpoint on the episodes of the improver's step ``k`` (seed ``seed + k``).

    ``k`` is the checkpoint's position, or its entry of ``steps`` (improvement steps' worth of env
    steps, for PPO's longer run).
    """
    rows = []
    for i, c in enumerate(checkpoints):
        k = i if steps is None else steps[i]
        success, mean_return = _evaluate(c.policy, tasks, episodes, seed + k)
        rows.append({"step": k, "env_steps": c.env_steps, "success": success, "mean_return": mean_return, "wall_s": c.wall_s})
    return rows


def improver_rows(
    improver: Improver, policy: nn.Module, tasks: Sequence[Task], settings: LoopSettings, steps: int, episodes: int, seed: int
) -> list[dict[str, Any]]:
    """Run the improvement loop and score its policy after each step like every other contender (without noise).

    The loop collects with ``settings`` (exploration noise included: what the next step watches);
    checkpoint ``k`` learned from the episodes of steps ``0..k-1`` and is scored on ``episodes``
    noise-free episodes of seed ``seed + k`` spread over ``tasks``.

    Returns:
        One row per step ``0..steps``: ``step``, ``env_steps`` (collected before that checkpoint),
        ``success``, ``mean_return`` and ``wall_s``.
    """
    checkpoints, learned = [], 0
    for state in improvement_loop(improver, policy, list(tasks), steps, episodes, seed=seed, progress=False, **asdict(settings)):
        checkpoints.append(Checkpoint(state.policy, learned, state.metrics["wall_s"]))
        learned = state.metrics["env_steps"]
    return _scored(checkpoints, tasks, episodes, seed)


def _improver_rows(improver: Improver, start: Start, mode: str, seed: int, config: BenchConfig) -> list[dict[str, Any]]:
    """:func:`improver_rows` with the benchmark's protocol: exploration ``config.noise`` and, in
    behaviour mode, the task exploration of ``config``."""
    offsets = (config.task_exploration, config.wide_task_exploration) if mode == "behaviour" else (0.0, 0.0)
    settings = LoopSettings(mode, config.noise, offsets[0], offsets[1], config.memory)
    return improver_rows(improver, start.policy, start.tasks, settings, config.steps, config.episodes, seed)


def _run_unit(
    config: BenchConfig, improver: Improver | None, maml_update: Any, start: Start, seed: int, budget: int
) -> dict[str, list[dict[str, Any]]]:
    """All contenders' rows for one (starting policy, seed) unit."""
    steps, episodes = config.steps, config.episodes
    tasks = spread(start.tasks, episodes)
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in config.contenders:
        if name.startswith("improver-"):
            runs[name] = _improver_rows(improver, start, name.split("-", 1)[1], seed, config)
        elif name == "ppo":
            from .baselines.ppo import ppo_steps

            grid = list(range(steps + 1)) + [m * steps for m in PPO_GRID if 1 < m <= max(config.ppo_multipliers)]
            ckpts = ppo_steps(start.policy, start.tasks, budget, grid, seed=seed, **config.ppo_kwargs)
            runs[name] = _scored(ckpts, start.tasks, episodes, seed, grid)
        elif name == "maml":
            if maml_update is None:
                continue
            from .baselines.maml import maml_steps

            runs[name] = _scored(maml_steps(maml_update, start.policy, tasks, steps, seed), start.tasks, episodes, seed)
        elif name == "bc":
            from .baselines.bc import bc_steps

            runs[name] = _scored(bc_steps(start.policy, tasks, steps, seed, noise=config.noise), start.tasks, episodes, seed)
    return runs


# --- aggregation -------------------------------------------------------------------------------


def aggregate(units: list[dict[str, Any]], contenders: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Per contender and checkpoint: mean and 95% CI over units of success, return and gap closed.

    ``gap_closed`` is the mean of the units' fractions; ``gap_closed_pooled`` is the fraction of
    the mean returns' gap.
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


# --- output ------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    found = {}
    for package in ("policy-improver", "torch", "stable-baselines3", "higher", "metaworld", "mujoco", "gymnasium", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _plot(table: dict[str, list[dict[str, Any]]], steps: int, x: str, path: Path, title: str) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
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
    plt.close(figure)


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


def run_benchmark(config: BenchConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark and write ``out/results.json``, ``out/results.md`` and two plots.

    Returns the results dict written to ``results.json``. Units already in ``out/results.json``
    from a run with the same settings (the numbers of seeds and policies aside) are kept, not rerun.

    Raises:
        ValueError: unknown suite, preset or contender; policies that do not fit the suite or
            the improver; ``out`` holds results of other settings.
        FileNotFoundError: missing improver checkpoint, policy folder or dataset.
    """
    config = config.resolved()
    started = time.perf_counter()
    suite = make_suite(config.suite, config.suite_seed)
    if "test" not in suite.splits:
        raise ValueError(f"suite {suite.name!r} has no held-out (test) split to benchmark on")
    starts = load_starts(Path(config.policies), suite, config.max_policies)
    improver = None
    if any(n.startswith("improver-") for n in config.contenders):
        improver = Improver.from_pretrained(config.improver)
        dims = (improver.config.obs_dim, improver.config.act_dim)
        if dims != (suite.observation_dim, suite.action_dim):
            raise ValueError(f"the improver at {config.improver} is for {dims[0]} observations and {dims[1]} actions; {suite.name} has {suite.observation_dim} and {suite.action_dim}")
    # recorded as used, so that resuming compares the settings actually run with
    config = config.with_loop_settings(improver.loop_settings if improver is not None else LoopSettings())
    seeds = [1000 * i for i in range(config.seeds)]  # apart, so that no two seeds share a step's episode seeds
    units, earlier_wall = _finished_units(out, config, {(s.name, seed) for s in starts for seed in seeds})
    started -= earlier_wall
    notes = [
        f"Improver: improver.loop.improvement_loop collecting with exploration noise {config.noise} (behaviour mode: task exploration {config.task_exploration}, {config.wide_task_exploration or config.task_exploration} after a step whose episodes all failed); its policies are scored without noise like every contender's, and its wall time includes collecting its episodes.",
        (
            "PPO: stable-baselines3 PPO from the starting policy's weights (improver.integrations.sb3.ppo_from_policy), "
            "tanh on the Gaussian mean, one update per episode; its longer run is one run scored at multiples of the improver's budget."
        ),
        f"BC: filtered behaviour cloning on the best 30% of the policy's own exploring episodes (Gaussian noise {config.noise}).",
    ]
    maml_update, maml_report = None, None
    # A resumed run keeps the MAML update its finished units were scored with.
    saved_update = config.maml_update or (out / "maml_update" if units and (out / "maml_update").is_dir() else None)
    if "maml" in config.contenders:
        if saved_update is not None:
            from .baselines.maml import MetaSGD

            maml_update = MetaSGD.from_pretrained(saved_update)
            for s in starts:
                maml_update.check(s.policy)
            maml_report = {**read_json_object(Path(saved_update) / "config.json")["metadata"], "loaded_from": str(saved_update)}
            notes.append(f"MAML: the update meta-trained by an earlier run was loaded from {saved_update} (its report is under 'maml').")
        elif config.data is None:
            notes.append("MAML: skipped, no --data train dataset given.")
        else:
            from .augment.dataset import ImprovementDataset
            from .baselines.maml import meta_train_maml

            m = config.maml
            dataset = ImprovementDataset(config.data)
            if len(dataset) == 0:
                raise ValueError(f"the MAML train dataset {config.data} holds no examples")
            # Fail before any training: the update has one step size per weight of the dataset's policies.
            shapes = [tuple(p.shape) for p in dataset.example(0).policy.parameters()]
            for s in starts:
                if [tuple(p.shape) for p in s.policy.parameters()] != shapes:
                    raise ValueError(f"starting policy {s.name} does not have the architecture of the policies in {config.data}; MAML cannot adapt it")
            maml_update, maml_report = meta_train_maml(
                dataset, m.examples, m.episodes, m.iterations, outer_lr=m.outer_lr, inner_steps=m.inner_steps,
                noise=config.noise, first_order=m.first_order, seed=0, progress=progress,
            )
            maml_update.save_pretrained(out / "maml_update", metadata=maml_report)
            notes.append(
                f"MAML: Meta-SGD step sizes and RWR temperature meta-trained with higher ({'second' if maml_report['second_order'] else 'first'} order, "
                f"{m.inner_steps} inner steps) on {maml_report['examples']} train examples of {config.data}; the starting policy is the "
                f"initialisation, so only the update is meta-learned. Its meta-training env steps ({maml_report['env_steps']}) are not counted per step."
            )
    horizon = starts[0].tasks[0].max_steps
    budget = config.episodes * horizon
    out.mkdir(parents=True, exist_ok=True)
    done = {(u["policy"], u["seed"]) for u in units}
    experts = {(tuple(u["tasks"]), u["seed"]): u["expert_return"] for u in units}
    results = None
    context = {"config": config, "suite": suite, "starts": starts, "seeds": seeds, "budget": budget, "notes": notes, "maml": maml_report}
    with tqdm(total=len(seeds) * len(starts), initial=len(units), desc="bench improve", unit="unit", disable=not progress) as bar:
        for seed in seeds:
            for start in starts:
                if (start.name, seed) in done:
                    continue
                key = (tuple(t.index for t in start.tasks), seed)
                if key not in experts:
                    experts[key] = _evaluate(suite.expert, start.tasks, config.episodes, seed)[1]
                runs = _run_unit(config, improver, maml_update, start, seed, budget)
                units.append({"policy": start.name, "tasks": [t.index for t in start.tasks], "seed": seed, "expert_return": experts[key], "runs": runs})
                bar.update()
                # Written after every unit, so that a long run cut short still leaves its results so far.
                results = _write_results(out, units, context, time.perf_counter() - started, complete=len(units) == len(seeds) * len(starts))
    if results is None:  # every unit was finished by the earlier run
        results = _write_results(out, units, context, time.perf_counter() - started, complete=True)
    return results


def _config_record(config: BenchConfig) -> dict[str, Any]:
    """``config`` as ``results.json`` stores it (JSON types: paths as strings, tuples as lists)."""
    record = {**asdict(config), "improver": str(config.improver), "policies": str(config.policies), "data": str(config.data) if config.data else None, "maml_update": str(config.maml_update) if config.maml_update else None}
    return json.loads(json.dumps(record, default=str))


def _finished_units(out: Path, config: BenchConfig, wanted: set[tuple[str, int]]) -> tuple[list[dict[str, Any]], float]:
    """Units (and wall time) of an earlier run into ``out`` with the same configuration, to resume from.

    Only the numbers of seeds and of policies may differ (seeds are ``0, 1000, ...`` and policies
    the first ``max_policies``, so asking for more adds units).

    Raises:
        ValueError: ``out/results.json`` was written with another configuration, or holds units
            (policy, seed) outside ``wanted``: a smaller run would rewrite it without them.
    """
    path = out / "results.json"
    if not path.is_file():
        return [], 0.0
    previous = read_json_object(path)
    if not isinstance(previous.get("config"), dict):
        raise ValueError(f"{path} holds no benchmark configuration: it was not written by `improver bench improve`, or was edited")
    # a setting that an older record lacks had its default then: a bare improver's for the loop settings
    recorded = {**_config_record(BenchConfig().with_loop_settings(LoopSettings())), **{RENAMED.get(k, k): v for k, v in previous["config"].items()}}
    old, new = ({k: v for k, v in c.items() if k not in ("seeds", "max_policies")} for c in (recorded, _config_record(config)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        raise ValueError(f"{path} holds a run with other settings ({', '.join(changed)}); resume with the same ones, or choose another --out")
    extra = sorted({(u["policy"], u["seed"]) for u in previous["per_unit"]} - wanted)
    if extra:
        raise ValueError(f"{path} holds units (policy, seed) this run does not ask for, {extra}; ask for at least as many --seeds and --max-policies, or choose another --out")
    return previous["per_unit"], previous["wall_time_s"]


def _write_results(out: Path, units: list[dict[str, Any]], context: dict[str, Any], wall: float, complete: bool) -> dict[str, Any]:
    config, starts, seeds = context["config"], context["starts"], context["seeds"]
    table = aggregate(units, config.contenders)
    results = {
        "complete": complete,
        "config": _config_record(config),
        "budget_per_step": context["budget"],
        "units": len(units),
        "seeds": seeds,
        "policies": [s.name for s in starts],
        "reward_function_versions": sorted({t.reward_function_version for s in starts for t in s.tasks}),
        "versions": _versions(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "maml": context["maml"],
        "table": table,
        "comparison": compare(table, config.steps),
        "ppo_to_match": ppo_to_match(table, config.steps),
        "notes": context["notes"] + ([] if complete else [f"INCOMPLETE: {len(units)} of {len(seeds) * len(starts)} units so far."]),
        "per_unit": units,
        "wall_time_s": wall,
    }
    if complete:  # plotting costs seconds; a run cut short can be plotted with write_plots(results.json's dict, out)
        write_plots(results, out)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(_markdown(results))
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=str))
    return results


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
