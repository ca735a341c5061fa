"""Any Gymnasium environment as an improver :class:`~improver.tasks.Task`.

A task's environment follows the rollout contract (the reset info carries the task parameters
under ``"task_parameters"``, each step's info ``"success"``); :class:`ContractWrapper` adds both to an
environment that lacks them, so ``improve(improver, policy, lambda: gym.make("Pendulum-v1"))`` works.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from improver.tasks import RenderConfig, Task

SuccessFn = Callable[[np.ndarray, float, dict[str, Any]], bool]


class ContractWrapper(gym.Wrapper):
    """Adds the task parameters to the reset info (the contract's ``"task_parameters"`` key) and ``info["success"]`` at every step.

    Args:
        env: A Gymnasium environment with a flat ``Box`` observation and action space.
        success: ``success(observation, reward, info) -> bool`` for one step; default: the
            step info's ``success_key`` (``False`` when absent).
        success_key: Info key read when no ``success`` function is given.
        task_parameters: The task's hidden parameters recorded with each episode (default: an empty vector, "unknown");
            an environment's own reset info entry wins.
    """

    def __init__(
        self, env: gym.Env, success: SuccessFn | None = None, success_key: str = "is_success", task_parameters: np.ndarray | None = None
    ) -> None:
        for name, space in (("observation", env.observation_space), ("action", env.action_space)):
            if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
                raise ValueError(f"the improver needs a flat Box {name} space; this environment has {space}")
        super().__init__(env)
        self.success, self.success_key = success, success_key
        self.task_parameters = np.zeros(0, np.float32) if task_parameters is None else np.asarray(task_parameters, np.float32).reshape(-1)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        parameters = info.get("task_parameters", self.task_parameters)
        return obs, {**info, "task_parameters": np.asarray(parameters, np.float32).reshape(-1)}

    def step(self, action: np.ndarray):
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = self.success(obs, float(reward), info) if self.success is not None else info.get(self.success_key, False)
        return obs, reward, terminated, truncated, {**info, "success": float(bool(done))}


def _build(make_env: Callable[..., gym.Env], success: SuccessFn | None, success_key: str, render: RenderConfig | None) -> gym.Env:
    env = make_env() if render is None else make_env(render_mode="rgb_array")
    return ContractWrapper(env, success, success_key)


def _time_limit(env: gym.Env) -> int | None:
    """The episode length limit of ``env``: its spec's, else that of a ``TimeLimit`` in its wrappers."""
    if env.spec is not None and env.spec.max_episode_steps is not None:
        return env.spec.max_episode_steps
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            return env._max_episode_steps
        env = env.env
    return None


def env_task(
    make_env: Callable[..., gym.Env],
    *,
    name: str = "env",
    max_steps: int | None = None,
    success: SuccessFn | None = None,
    success_key: str = "is_success",
) -> Task:
    """Turn an environment factory into a :class:`Task` that ``rollout`` and ``improve`` accept.

    Args:
        make_env: Returns a new environment; called with ``render_mode="rgb_array"`` when frames
            are asked for. Use a module-level function or ``functools.partial`` (not a lambda)
            if episodes run in worker processes.
        name: Recorded as the episodes' suite and family.
        max_steps: Episode length limit; default: the environment's ``spec.max_episode_steps``
            or its ``TimeLimit`` wrapper's.
        success: ``success(observation, reward, info) -> bool`` per step (default: ``info[success_key]``).
        success_key: Info key holding the success flag.

    Raises:
        ValueError: if neither ``max_steps`` nor the environment's spec gives an episode length.
    """
    if max_steps is None:
        probe = make_env()
        try:
            max_steps = _time_limit(probe)
        finally:
            probe.close()
        if max_steps is None:
            raise ValueError(
                "the environment has no time limit (spec.max_episode_steps or a TimeLimit wrapper); pass env_task(..., max_steps=N)"
            )
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive; got {max_steps}")
    return Task(name, name, "test", 0, 0, max_steps, "env", build=partial(_build, make_env, success, success_key))
