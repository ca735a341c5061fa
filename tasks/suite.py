"""What a task and a suite are. Concrete suites live in ``toy`` and ``metaworld_suite``."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Callable

import gymnasium as gym

from improver.types import Policy

from .rendering import RenderConfig

EnvBuilder = Callable[[RenderConfig | None], gym.Env]


@dataclass(frozen=True)
class Task:
    """One task of a suite: a family and one setting of its hidden parameters (goal, objects).

    The environment it builds follows the rollout contract: ``reset(seed=...)`` is honoured,
    the reset ``info`` carries ``"task_parameters"``, each step's ``info`` carries ``"success"``, and the
    observation is what the learner may see (goal hidden in ML suites).

    Attributes:
        suite: Suite name, e.g. ``"ML1:push-v3"``.
        family: Task family, e.g. ``"push-v3"``.
        split: ``"train"`` or ``"test"``.
        index: Position in its split.
        suite_seed: Seed the suite was built with.
        max_steps: Episode length limit.
        reward_function_version: Reward version recorded with every episode.
        build: Makes the environment, rendering with the given config or not at all.
    """

    suite: str
    family: str
    split: str
    index: int
    suite_seed: int
    max_steps: int
    reward_function_version: str
    build: EnvBuilder = field(repr=False, compare=False)

    def make_env(self, render: RenderConfig | None = None) -> gym.Env:
        """Build this task's environment (rendering ``rgb_array`` frames if ``render`` is given)."""
        return self.build(render)


@dataclass(frozen=True)
class Suite:
    """A task distribution with named splits; held-out tasks live only in ``"test"``.

    Attributes:
        name: Registry name, e.g. ``"ML1:push-v3"`` or ``"toy:reach2d"``.
        seed: Seed the task parameters were drawn with.
        splits: Tasks per split name.
        expert: A scripted expert policy (it implements ``for_task``).
        observation_dim: Size of the learner's observation.
        action_dim: Size of an action.
    """

    name: str
    seed: int
    splits: dict[str, tuple[Task, ...]]
    expert: Policy
    observation_dim: int
    action_dim: int

    def tasks(self, split: str) -> tuple[Task, ...]:
        """The tasks of ``split`` (``"train"`` or ``"test"``); raises ``ValueError`` if absent."""
        if split not in self.splits:
            raise ValueError(f"suite {self.name!r} has no split {split!r}; its splits are {sorted(self.splits)}")
        return self.splits[split]

    def first(self, split: str, count: int | None) -> tuple[Task, ...]:
        """``count`` tasks of ``split`` (all if ``None``), taken from its families in turn.

        Meta-World lists a multi-family split family by family (ML10's first 50 train tasks are
        all reach-v3), so a plain prefix would see one family; with one family this is the prefix.
        """
        tasks = self.tasks(split)
        by_family: dict[str, list[Task]] = {}
        for task in tasks:
            by_family.setdefault(task.family, []).append(task)
        turns = [t for group in zip_longest(*by_family.values()) for t in group if t is not None]
        return tuple(turns[: len(tasks) if count is None else count])

    @property
    def families(self) -> dict[str, tuple[str, ...]]:
        """Task family names per split, in order of first appearance."""
        return {s: tuple(dict.fromkeys(t.family for t in ts)) for s, ts in self.splits.items()}
