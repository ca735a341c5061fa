"""The improvement loop, used like an RL loop: collect episodes with the policy, ``step``, repeat."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Literal, Sequence

from torch import nn

from .operator import Improver
from .tasks import Task, rollout
from .tasks.evaluation import spread
from .types import Trajectory


def improve(
    improver: Improver,
    policy: nn.Module,
    tasks: Task | Sequence[Task],
    steps: int = 3,
    episodes: int = 10,
    seed: int = 0,
    mode: Literal["parameters", "behaviour"] = "parameters",
    reward_free: bool = False,
    memory: int = 1,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Run ``steps`` improvement steps of ``episodes`` episodes each (spread over ``tasks``).

    Each step watches the episodes of the last ``memory`` steps (1: only the current policy's,
    like an RL update; more: earlier policies' episodes too, which spread the visited states
    the goal is located from).

    Returns the final policy and one row per step (step 0 is the starting policy): success rate,
    mean return, env steps used so far and wall time.
    """
    tasks = spread([tasks] if isinstance(tasks, Task) else list(tasks), episodes)
    if memory < 1:
        raise ValueError(f"memory must be at least 1 step; got {memory}")
    rows, env_steps, start, history = [], 0, time.perf_counter(), []
    for k in range(steps + 1):
        experience = rollout(policy, tasks, 1, seed=seed + k, progress=False)
        env_steps += int(experience.lengths.sum())
        rows.append(
            {
                "step": k,
                "success": float(experience.success.float().mean()),
                "mean_return": float(experience.returns.mean()),
                "env_steps": env_steps,
                "wall_s": time.perf_counter() - start,
            }
        )
        if k < steps:
            if reward_free:
                experience = replace(experience, rewards=None)
            history = [*history, experience][-memory:]
            policy = improver.step(policy, Trajectory.cat(history), mode=mode)
    return policy, rows


def heldout_success(
    improver: Improver, dataset: Any, episodes: int = 2, seed: int = 0, mode: Literal["parameters", "behaviour"] = "parameters"
) -> dict[str, float]:
    """Success of a dataset's lesser policies on their own tasks before and after one ``step``.

    Meant for a dataset of held-out tasks (``improver generate --split test``); each example's
    stored episodes are the experience the step sees.
    """
    from .tasks import make_suite

    before, after = [], []
    for i in range(len(dataset)):
        example = dataset.example(i)
        info = example.lesser.tasks[0]
        task = make_suite(info.suite, info.suite_seed).tasks(info.split)[info.index]
        improved = improver.step(example.policy, example.lesser, mode=mode)
        for policy, results in ((example.policy, before), (improved, after)):
            results.append(float(rollout(policy, task, episodes, seed=seed, progress=False).success.float().mean()))
    return {"success_before": sum(before) / len(before), "success_after": sum(after) / len(after)}
