"""The held-out benchmark's protocol (``improver bench improve``): what runs, on which starts, and resuming.

Protocol (Meta-World's conventions; see ``BenchConfig`` for the knobs):

- Every contender (:mod:`improver.bench.contenders`) starts from the same saved lesser policies, each on
  its own held-out task (the task its record names), and per improvement step learns from ``episodes``
  episodes' worth of env steps: the improver and the baselines alike.
- Checkpoint ``k`` of every contender is scored on the same ``episodes`` deterministic episodes
  (tasks and reset seeds of the improver's step-``k`` experience, ``seed + k``); an episode
  succeeds if its success flag is set at any step. For the improver those episodes are also the
  experience of its next step; for the others they are extra and not counted as env steps.
- PPO also runs on, to ``max(ppo_multipliers)`` times the improver's whole budget, to report
  how many env steps it needs to reach the improver's final success and return.
- Units are (starting policy, seed) pairs; tables give their mean with a 95% t-interval
  (:mod:`improver.bench.statistics`). The fraction of the gap closed is ``(R_k - R_0) / (R_expert - R_0)``
  per unit, with ``R_expert`` the suite's scripted expert on the same episodes.
- ``results.json`` is rewritten after every unit (:mod:`improver.bench.report`); running again into the same
  folder with the same settings resumes after the finished units (asking for more seeds or policies adds units).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..loop_settings import RENAMED, LoopSettings
from ..operator import Improver
from ..policies import load_policy
from ..saved_files import read_json_object
from ..tasks import Suite, Task, make_suite
from .contenders import CONTENDERS, DEFAULT_CONTENDERS, Setup, Skipped, evaluate
from .report import write_results
from .statistics import aggregate, compare, ppo_to_match


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
    contenders: tuple[str, ...] = DEFAULT_CONTENDERS
    """Names in :data:`~improver.bench.contenders.CONTENDERS` to run."""
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


@dataclass(frozen=True)
class Start:
    """A starting policy and the held-out tasks it is improved on."""

    name: str
    """Its folder's name; a unit is (name, seed)."""
    policy: nn.Module
    """Maps observations ``[B, obs_dim]`` to actions ``[B, act_dim]``; every contender starts from it."""
    tasks: tuple[Task, ...]
    """The held-out task its record names, or all of the suite's held-out tasks."""


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
    improver = _load_improver(config, suite)
    # recorded as used, so that resuming compares the settings actually run with
    config = config.with_loop_settings(improver.loop_settings if improver is not None else LoopSettings())
    seeds = [1000 * i for i in range(config.seeds)]  # apart, so that no two seeds share a step's episode seeds
    units, earlier_wall = finished_units(out, config, {(s.name, seed) for s in starts for seed in seeds})
    started -= earlier_wall
    setup = Setup(config, tuple(starts), improver, out, bool(units), progress)
    prepared = [CONTENDERS[name](setup) for name in config.contenders]
    contenders = [c for c in prepared if not isinstance(c, Skipped)]
    run = {
        "config": _config_record(config),
        "budget_per_step": config.episodes * starts[0].tasks[0].max_steps,
        "seeds": seeds,
        "policies": [s.name for s in starts],
        "reward_function_versions": sorted({t.reward_function_version for s in starts for t in s.tasks}),
        "versions": _versions(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "reports": {c.name: c.report for c in contenders if c.report is not None},
        "notes": [c.note for c in prepared],
    }
    out.mkdir(parents=True, exist_ok=True)
    done = {(u["policy"], u["seed"]) for u in units}
    experts = {(tuple(u["tasks"]), u["seed"]): u["expert_return"] for u in units}
    results = None
    with tqdm(total=len(seeds) * len(starts), initial=len(units), desc="bench improve", unit="unit", disable=not progress) as bar:
        for seed in seeds:
            for start in starts:
                if (start.name, seed) in done:
                    continue
                key = (tuple(t.index for t in start.tasks), seed)
                if key not in experts:
                    experts[key] = evaluate(suite.expert, start.tasks, config.episodes, seed)[1]
                runs = {c.name: c.rows(start.policy, start.tasks, run["budget_per_step"], config.steps, config.episodes, seed) for c in contenders}
                units.append({"policy": start.name, "tasks": [t.index for t in start.tasks], "seed": seed, "expert_return": experts[key], "runs": runs})
                bar.update()
                # Written after every unit, so that a long run cut short still leaves its results so far.
                results = _results(run, units, time.perf_counter() - started, complete=len(units) == len(seeds) * len(starts))
                write_results(results, out)
    if results is None:  # every unit was finished by the earlier run
        results = _results(run, units, time.perf_counter() - started, complete=True)
        write_results(results, out)
    return results


def _load_improver(config: BenchConfig, suite: Suite) -> Improver | None:
    """The trained improver if an ``improver-`` contender is asked for, checked against the suite's sizes."""
    if not any(n.startswith("improver-") for n in config.contenders):
        return None
    improver = Improver.from_pretrained(config.improver)
    dims = (improver.config.obs_dim, improver.config.act_dim)
    if dims != (suite.observation_dim, suite.action_dim):
        raise ValueError(
            f"the improver at {config.improver} is for {dims[0]} observations and {dims[1]} actions; "
            f"{suite.name} has {suite.observation_dim} and {suite.action_dim}"
        )
    return improver


def _results(run: dict[str, Any], units: list[dict[str, Any]], wall: float, complete: bool) -> dict[str, Any]:
    """The contents of ``results.json``: the run's record, the units so far and their statistics."""
    contenders, steps = run["config"]["contenders"], run["config"]["steps"]
    table = aggregate(units, contenders)
    incomplete = [] if complete else [f"INCOMPLETE: {len(units)} of {len(run['seeds']) * len(run['policies'])} units so far."]
    return {
        "complete": complete,
        **{k: v for k, v in run.items() if k != "notes"},
        "units": len(units),
        "table": table,
        "comparison": compare(table, steps),
        "ppo_to_match": ppo_to_match(table, steps),
        "notes": run["notes"] + incomplete,
        "per_unit": units,
        "wall_time_s": wall,
    }


def _versions() -> dict[str, str]:
    found = {}
    for package in ("policy-improver", "torch", "stable-baselines3", "higher", "metaworld", "mujoco", "gymnasium", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _config_record(config: BenchConfig) -> dict[str, Any]:
    """``config`` as ``results.json`` stores it (JSON types: paths as strings, tuples as lists)."""
    record = {**asdict(config), "improver": str(config.improver), "policies": str(config.policies), "data": str(config.data) if config.data else None, "maml_update": str(config.maml_update) if config.maml_update else None}
    return json.loads(json.dumps(record, default=str))


def finished_units(out: Path, config: BenchConfig, wanted: set[tuple[str, int]]) -> tuple[list[dict[str, Any]], float]:
    """Units (and wall time) of an earlier run into ``out`` with the same configuration, to resume from.

    Only the numbers of seeds and of policies may differ (seeds are ``0, 1000, ...`` and policies
    the first ``max_policies``, so asking for more adds units). A record written before a setting
    existed counts as that setting's default, and keys renamed since are read under their new names.

    Args:
        out: The run's output folder.
        config: The resolved configuration of this run, loop settings filled in.
        wanted: The (policy, seed) units this run asks for.

    Returns:
        The finished units (empty without ``out/results.json``) and the wall time they took.

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


