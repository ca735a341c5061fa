"""Build the meta-training dataset for a suite split: ranked families, policy zoo, targets.

One shard per task, computed from ``(seed, split, task index)`` alone, so shards can be made in
any order, by any number of processes (``accelerate launch``), and a killed run resumes by
making only the shards that are missing. The manifest is built from the shards on disk.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from improver.io import atomic_path
from improver.tasks import RenderConfig, Suite, Task, make_suite, relabel
from improver.tasks.evaluation import format_table

from .dataset import FORMAT_VERSION, sha256, shard_examples, write_manifest, write_shard
from .drex import NoiseLadder, check_noise_ranking, ranked_family
from .noise import derive_seed
from .zoo import GRADED_RECIPES, ZooRecipe, plot_zoo, train_member


@dataclass(frozen=True)
class Preset:
    """Dataset size.

    Attributes:
        tasks: Tasks of the split to use (``None``: all).
        ladder: D-REX noise ladder for the ranked family.
        episodes_per_level: Ranked episodes per noise level.
        recipes: One zoo member per recipe.
        lesser_episodes: Episodes recorded per zoo member.
        max_steps: Episode length cap (``None``: the task's own).
    """

    tasks: int | None
    ladder: NoiseLadder
    episodes_per_level: int
    recipes: tuple[ZooRecipe, ...]
    lesser_episodes: int
    max_steps: int | None


PRESETS: dict[str, Preset] = {
    "tiny": Preset(3, NoiseLadder((1.0, 0.5, 0.02)), 2, (ZooRecipe(0.9, 1, 5), ZooRecipe(0.3, 2, 50, relabel=True)), 2, 100),
    "demo": Preset(10, NoiseLadder(), 2, GRADED_RECIPES, 2, None),
    "full": Preset(None, NoiseLadder.evenly(20), 2, GRADED_RECIPES, 3, None),
}
SPLIT_CODES = {"train": 0, "test": 1}


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of a dataset; a folder only ever holds one setting (resume checks it)."""

    suite: str
    split: str = "train"
    preset: Literal["tiny", "demo", "full"] = "demo"
    seed: int = 0
    suite_seed: int = 0
    frames: bool = False
    render: RenderConfig = field(default_factory=RenderConfig)
    tasks: int | None = None
    """Use only ``tasks`` tasks of the split, from its families in turn (default: the preset's number)."""


def shard_name(task: Task) -> str:
    """File name of ``task``'s shard."""
    return f"{task.split}-{task.index:04d}.h5"


def make_shard(suite: Suite, task: Task, preset: Preset, config: GenerateConfig, path: Path) -> None:
    """Generate and write one task's shard (ranked family, zoo examples, expert targets)."""
    seed = derive_seed(config.seed, SPLIT_CODES.get(task.split, 2), task.index)
    render = config.render if config.frames else None
    family = ranked_family(
        suite.expert, task, preset.ladder, preset.episodes_per_level, seed=derive_seed(seed, 0), render=render, max_steps=preset.max_steps
    )
    drex = check_noise_ranking(family, warn=False)[0]
    better = family.trajectory.take(family.levels == family.levels.min())
    examples, env_steps = [], int(family.trajectory.lengths.sum())
    for k, recipe in enumerate(preset.recipes):
        member = train_member(
            suite, task, recipe, seed=derive_seed(seed, 1, k), eval_episodes=preset.lesser_episodes, render=render, max_steps=preset.max_steps
        )
        env_steps += member.record["demo_env_steps"] + member.record["eval_env_steps"]
        examples.append(
            {
                "theta": member.policy.state_dict(),
                "architecture": member.record["architecture"],
                "record": member.record,
                "lesser": member.experience,
                "target_actions": relabel(suite.expert, member.experience),
            }
        )
    task_record = {"suite": task.suite, "family": task.family, "split": task.split, "index": task.index, "suite_seed": task.suite_seed}
    write_shard(
        path,
        task={**task_record, "drex": drex, "env_steps": env_steps},
        ranked=family.trajectory,
        levels=family.levels,
        better=better,
        examples=examples,
    )


def _check_settings(out: Path, config: GenerateConfig) -> None:
    settings = json.dumps(asdict(config), indent=2, default=str)
    path = out / "generate_config.json"
    if path.exists() and path.read_text() != settings:
        raise ValueError(f"{out} holds a dataset generated with other settings ({path}); use a new --out folder")
    with atomic_path(path) as tmp:
        tmp.write_text(settings)


def generate(config: GenerateConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Generate (or finish) the dataset in ``out`` and return its manifest.

    Runs on every process of an ``accelerate launch``; shards are split between processes.
    Generation is CPU work (env steps), so processes talk over gloo even on a GPU machine.
    """
    state = PartialState(cpu=True)
    out = Path(out)
    suite = make_suite(config.suite, config.suite_seed)
    preset = PRESETS[config.preset]
    tasks = suite.first(config.split, config.tasks or preset.tasks)
    shards = out / "shards"
    if state.is_main_process:
        shards.mkdir(parents=True, exist_ok=True)
        _check_settings(out, config)
        for leftover in shards.glob(".*"):  # temporaries of a killed run
            shutil.rmtree(leftover, ignore_errors=True)
    state.wait_for_everyone()
    if state.num_processes > 1:
        torch.set_num_threads(1)  # two cores, two processes: avoid oversubscription
    pending = [t for t in tasks if not (shards / shard_name(t)).exists()]
    start = time.perf_counter()
    made = []
    with state.split_between_processes(pending) as mine:
        for task in tqdm(mine, desc=f"generate {config.suite} [{config.split}]", unit="task", disable=not (progress and state.is_local_main_process)):
            make_shard(suite, task, preset, config, shards / shard_name(task))
            made.append(shard_name(task))
    made = gather_object(made) if state.num_processes > 1 else made
    state.wait_for_everyone()
    manifest = _manifest(out, config, tasks, made, time.perf_counter() - start, state.num_processes)
    if state.is_main_process:
        write_manifest(out, manifest)
        plot_zoo([z for entry in manifest["shards"].values() for z in entry["zoo"]], out / "zoo.png")
        _print_report(manifest)
    state.wait_for_everyone()
    return manifest


def _manifest(
    out: Path, config: GenerateConfig, tasks: list[Task], made: list[str], seconds: float, processes: int
) -> dict[str, Any]:
    entries = {}
    for task in tasks:
        path = out / "shards" / shard_name(task)
        with h5py.File(path, "r") as f:
            info = json.loads(f.attrs["task"])
            records = [json.loads(g.attrs["record"]) for g in f["examples"].values()]
        entries[shard_name(task)] = {
            "sha256": sha256(path),
            "examples": shard_examples(path),
            "env_steps": info["env_steps"],
            "drex": info["drex"],
            "zoo": [{"recipe": r["recipe"], "success": r["success"], "mean_return": r["mean_return"]} for r in records],
        }
    holds = [e["drex"]["holds"] for e in entries.values()]
    steps_this_run = sum(entries[name]["env_steps"] for name in made)
    return {
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "shards": entries,
        "examples": sum(e["examples"] for e in entries.values()),
        "drex_holds_fraction": sum(holds) / len(holds),
        "this_run": {
            "processes": processes,
            "shards_made": len(made),
            "env_steps": steps_this_run,
            "seconds": seconds,
            "env_steps_per_s": steps_this_run / seconds if made else None,
        },
    }


def _print_report(manifest: dict[str, Any]) -> None:
    rows = [
        {
            "shard": name,
            "rho(noise, return)": e["drex"]["rho_return"],
            "rho(noise, success)": e["drex"]["rho_success"],
            "zoo success": " ".join(f"{z['success']:.2f}" for z in e["zoo"]),
            "zoo return": " ".join(f"{z['mean_return']:.0f}" for z in e["zoo"]),
        }
        for name, e in manifest["shards"].items()
    ]
    print(format_table(rows))
    run = manifest["this_run"]
    print(
        f"{manifest['examples']} examples in {len(rows)} shards; D-REX assumption holds on "
        f"{manifest['drex_holds_fraction']:.0%} of tasks; this run made {run['shards_made']} shards, "
        f"{run['env_steps']} env steps in {run['seconds']:.1f} s"
        + (f" ({run['env_steps_per_s']:.0f} steps/s)" if run["env_steps_per_s"] else "")
    )
