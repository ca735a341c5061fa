"""Build the meta-training dataset for a suite split: ranked families, policy zoo, targets.

One shard per task, computed from ``(seed, split, task index)`` alone, so shards can be made in
any order, by any number of processes (``accelerate launch``), and a rerun (after a kill, say)
checks every shard on disk and makes only those that are missing or bad. The manifest is built
from the shards on disk. Generation writes only into a new or empty folder or one holding a
dataset of the same settings, and there touches nothing but the dataset's own files.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import h5py
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from improver.io import atomic_path, leftover_temporaries
from improver.tasks import RenderConfig, Suite, Task, make_suite, relabel
from improver.tasks.evaluation import format_table

from .dataset import FORMAT_VERSION, MANIFEST, check_shard, sha256, shard_examples, shard_name, shard_settings, write_manifest, write_shard
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
SETTINGS = "generate_config.json"
DATASET_FILES = (SETTINGS, MANIFEST, "zoo.png", "shards")


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of a dataset; a folder only ever holds one setting (resume checks it)."""

    suite: str
    """Suite name, e.g. ML1:push-v3 or toy:reach2d."""
    split: Literal["train", "test"] = "train"
    """Which split's tasks to use."""
    preset: Literal["tiny", "demo", "full"] = "demo"
    """Size: tiny (tests), demo (10 tasks), full (all tasks, 20 noise levels)."""
    seed: int = 0
    """Seed of every episode, noise draw and zoo member."""
    suite_seed: int = 0
    """Seed the suite's task parameters are drawn with."""
    frames: bool = False
    """Render the lesser and ranked episodes (every ``render.every`` steps)."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """How frames are rendered with ``frames``."""
    tasks: int | None = None
    """Use only ``tasks`` tasks of the split, from its families in turn (default: the preset's number)."""
    raw_expert_families: tuple[str, ...] = ()
    """Families whose expert is the suite expert's raw form (``expert.raw(families)``, e.g. a
    Meta-World scripted policy without smoothing); ``improver train`` names those whose expert
    check found the smoothing costs success."""

    def record(self) -> dict[str, Any]:
        """The settings as the dataset records them (``asdict``, without ``raw_expert_families``
        when empty, so that datasets made before that field existed keep matching their settings)."""
        record = asdict(self)
        if not self.raw_expert_families:
            del record["raw_expert_families"]
        return record

    def __post_init__(self) -> None:
        if self.split not in SPLIT_CODES:
            raise ValueError(f"unknown split {self.split!r}; choose one of {sorted(SPLIT_CODES)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.tasks is not None and self.tasks < 1:
            raise ValueError(f"tasks must be at least 1, or None for the preset's number; got {self.tasks}")


def dataset_suite(config: dict[str, Any], suite_seed: int | None = None) -> Suite:
    """The suite a dataset was generated from, with the expert it imitated.

    Args:
        config: The dataset's settings, ``GenerateConfig.record()`` (its manifest's ``config``).
        suite_seed: The suite's seed if not the config's.

    Raises:
        ValueError: the config names raw-expert families but the suite's expert has no raw form.
    """
    suite = make_suite(config["suite"], config["suite_seed"] if suite_seed is None else suite_seed)
    families = tuple(config.get("raw_expert_families", ()))  # older datasets: none
    if not families:
        return suite
    if not hasattr(suite.expert, "raw"):
        raise ValueError(f"raw_expert_families {families} asks for the raw form of an expert that has none ({type(suite.expert).__name__})")
    return replace(suite, expert=suite.expert.raw(families))


def task_record(task: Task, config: GenerateConfig) -> dict[str, Any]:
    """What ``task``'s shard records about itself: the task and the settings it was made with."""
    return {
        "suite": task.suite, "family": task.family, "split": task.split, "index": task.index, "suite_seed": task.suite_seed,
        "settings": shard_settings(config.record()),
    }


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
    write_shard(
        path,
        task={**task_record(task, config), "drex": drex, "env_steps": env_steps},
        ranked=family.trajectory,
        levels=family.levels,
        better=better,
        examples=examples,
    )


def _check_out(out: Path, settings: str) -> None:
    """Refuse an ``out`` that is not new, empty, or a dataset of ``settings`` (the JSON of a config)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out} is not a folder; give a new or empty folder for the dataset")
    path = out / SETTINGS
    if path.is_file():
        if path.read_text() != settings:
            raise ValueError(f"{out} holds a dataset generated with other settings ({path}); use a new --out folder")
        return
    others = sorted(p.name for p in set(out.iterdir()) - set(leftover_temporaries(out, DATASET_FILES)))
    if others:
        raise FileExistsError(
            f"{out} is not empty and holds no dataset (no {SETTINGS}; it holds {others[:5]}); "
            "nothing was written: give a new or empty --out folder, or the folder of the dataset to finish"
        )


def _recorded_checksums(out: Path) -> dict[str, str]:
    """Shard name -> SHA-256 from the manifest an earlier run wrote (empty if there is none)."""
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        return {name: entry["sha256"] for name, entry in json.loads(path.read_text())["shards"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{path} is damaged ({err!r}), so the shards cannot be verified against it: delete it to rerun "
            "(shards that open and hold their tasks are then kept), or use a new --out folder"
        ) from err


def _to_make(out: Path, config: GenerateConfig, tasks: tuple[Task, ...]) -> list[str]:
    """Names of the shards to make: those missing, and those that fail their check (printed with the reason)."""
    checksums = _recorded_checksums(out)
    names = []
    for task in tasks:
        name = shard_name(task.split, task.index)
        path = out / "shards" / name
        if not path.exists():
            names.append(name)
            continue
        try:
            check_shard(path, task_record(task, config), checksums.get(name))
        except ValueError as err:
            print(f"making {name} again: {err}")
            names.append(name)
    return names


def generate(config: GenerateConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Generate (or finish) the dataset in ``out`` and return its manifest.

    ``out`` must be absent, empty, or hold a dataset of the same settings; there every shard on
    disk is checked (it opens, holds its task and settings, matches the manifest's checksum) and
    the missing or bad ones are made. Runs on every process of an ``accelerate launch``; shards are
    split between processes. Generation is CPU work (env steps), so processes talk over gloo even
    on a GPU machine.

    Raises:
        FileExistsError: ``out`` holds files and no dataset.
        ValueError: ``out`` holds a dataset of other settings, or a damaged manifest.
    """
    state = PartialState(cpu=True)
    out = Path(out)
    settings = json.dumps(config.record(), indent=2, default=str)
    _check_out(out, settings)  # on every process before anything is written, so a refusal stops them all
    suite = dataset_suite(config.record())
    preset = PRESETS[config.preset]
    tasks = suite.first(config.split, preset.tasks if config.tasks is None else config.tasks)
    shards = out / "shards"
    state.wait_for_everyone()
    todo = []
    if state.is_main_process:
        if not (out / SETTINGS).exists():
            with atomic_path(out / SETTINGS) as tmp:
                tmp.write_text(settings)
        shards.mkdir(exist_ok=True)
        names = [shard_name(t.split, t.index) for t in tasks]
        for leftover in leftover_temporaries(out, DATASET_FILES) + leftover_temporaries(shards, names):  # of a killed run
            shutil.rmtree(leftover)
        todo = _to_make(out, config, tasks)
    todo = set(broadcast_object_list([todo])[0])
    if state.num_processes > 1:
        torch.set_num_threads(1)  # two cores, two processes: avoid oversubscription
    pending = [t for t in tasks if shard_name(t.split, t.index) in todo]
    start = time.perf_counter()
    made = []
    with state.split_between_processes(pending) as mine:
        for task in tqdm(mine, desc=f"generate {config.suite} [{config.split}]", unit="task", disable=not (progress and state.is_local_main_process)):
            name = shard_name(task.split, task.index)
            make_shard(suite, task, preset, config, shards / name)
            made.append(name)
    made = gather_object(made) if state.num_processes > 1 else made
    state.wait_for_everyone()
    manifest = _manifest(out, config, tasks, made, time.perf_counter() - start, state.num_processes)
    # A rerun that made nothing keeps the manifest (and its run's figures) byte for byte: a
    # meta-training run is bound to the manifest's SHA-256 and resumes only on the same one.
    if state.is_main_process and (made or not (out / MANIFEST).exists()):
        write_manifest(out, manifest)
        plot_zoo([z for entry in manifest["shards"].values() for z in entry["zoo"]], out / "zoo.png")
        _print_report(manifest)
    state.wait_for_everyone()
    return manifest


def _manifest(
    out: Path, config: GenerateConfig, tasks: tuple[Task, ...], made: list[str], seconds: float, processes: int
) -> dict[str, Any]:
    entries = {}
    for task in tasks:
        path = out / "shards" / shard_name(task.split, task.index)
        with h5py.File(path, "r") as f:
            info = json.loads(f.attrs["task"])
            records = [json.loads(g.attrs["record"]) for g in f["examples"].values()]
        entries[path.name] = {
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
        "config": config.record(),
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
