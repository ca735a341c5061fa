"""PPO (stable-baselines3) fine-tuning the starting policy, on the improver's env-step budget and beyond."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from improver.tasks import Task

from . import Checkpoint


def ppo_steps(
    policy: nn.Module,
    tasks: Sequence[Task],
    budget: int,
    checkpoints: Sequence[int],
    seed: int = 0,
    **ppo_kwargs: Any,
) -> Iterator[Checkpoint]:
    """Fine-tune ``policy`` with PPO and yield it after ``budget * c`` env steps for each ``c`` in ``checkpoints``.

    One environment per distinct task of ``tasks`` (a ``DummyVecEnv`` of
    :class:`~improver.integrations.sb3.TaskEnv`); the model starts from ``policy`` through
    :func:`~improver.integrations.sb3.ppo_from_policy`. By default PPO updates once per episode per
    environment (``n_steps`` = the task's episode length, minibatches of a fifth of a rollout but at
    least 64 steps, 10 epochs);
    ``ppo_kwargs`` override that. SB3 learns in whole rollouts, so a checkpoint may use up to one
    rollout more than asked; its ``env_steps`` is the number PPO really used.

    Args:
        policy: The starting ``MLPPolicy`` (not modified).
        tasks: Tasks to train on (repeats are dropped).
        budget: Env steps per unit of ``checkpoints`` (the improver's steps per improvement step).
        checkpoints: Increasing multiples of ``budget``; 0 yields the starting policy.
        seed: Seed of PPO (weights of the critic, sampling) and of the environments' resets.
        **ppo_kwargs: Passed to ``PPO``.

    Yields:
        One :class:`Checkpoint` per entry of ``checkpoints``; its ``policy`` acts with the mode
        of PPO's current action distribution (a live view of the model).
    """
    from stable_baselines3.common.vec_env import DummyVecEnv

    from improver.integrations.sb3 import SB3Actor, TaskEnv, ppo_from_policy

    if list(checkpoints) != sorted(checkpoints) or any(c < 0 for c in checkpoints):
        raise ValueError(f"checkpoints must be non-negative and increasing; got {list(checkpoints)}")
    distinct = list({(t.suite, t.split, t.index): t for t in tasks}.values())
    env = DummyVecEnv([lambda t=t: TaskEnv(t) for t in distinct])
    horizon = distinct[0].max_steps
    rollout_size = horizon * len(distinct)
    # Minibatches of a fifth of a rollout, but not below 64 steps: tiny ones cost far more time than they help.
    defaults = {"n_steps": horizon, "batch_size": min(rollout_size, max(64, rollout_size // 5)), "n_epochs": 10, "seed": seed, "verbose": 0}
    start = time.perf_counter()
    model = ppo_from_policy(policy, env, **{**defaults, **ppo_kwargs})
    actor = SB3Actor(model.policy).eval()
    wall = time.perf_counter() - start
    try:
        for c in checkpoints:
            target = int(c * budget)
            if target > model.num_timesteps:
                # Timed here, not across the yield: the caller's evaluation is not PPO's time.
                start = time.perf_counter()
                model.learn(total_timesteps=target - model.num_timesteps, reset_num_timesteps=False)
                wall += time.perf_counter() - start
            yield Checkpoint(actor, int(model.num_timesteps), wall)
    finally:
        env.close()
