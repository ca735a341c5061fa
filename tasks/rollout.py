"""Collect episodes from one or many tasks with Gymnasium vector environments."""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from improver.policies import placement as policy_placement
from improver.types import Policy, TaskInfo, Trajectory

from .rendering import RenderConfig, to_chw
from .suite import Task


def episode_seeds(seed: int, count: int) -> list[int]:
    """The reset seeds of ``count`` episodes collected with ``seed``."""
    return [int(s) for s in np.random.default_rng(seed).integers(0, 2**31 - 1, size=count)]


def _bind(policy: Policy, infos: Sequence[TaskInfo]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Act with ``policy``, or with one ``policy.for_task(info)`` per row when it needs its task."""
    if not hasattr(policy, "for_task"):
        return policy
    bound = [policy.for_task(info) for info in infos]
    return lambda obs: torch.cat([b(row[None]) for b, row in zip(bound, obs)])


def _act(policy: Callable[[torch.Tensor], torch.Tensor], obs: np.ndarray, placement, action_dim: int) -> np.ndarray:
    device, dtype = placement
    with torch.no_grad():
        try:
            actions = policy(torch.as_tensor(obs, device=device, dtype=dtype))
        except RuntimeError as err:
            raise ValueError(f"the policy could not act on observations of shape {tuple(obs.shape)}: {err}") from err
    actions = torch.as_tensor(actions)
    if tuple(actions.shape) != (obs.shape[0], action_dim):
        raise ValueError(
            f"the policy returned actions of shape {tuple(actions.shape)}; the environment expects {(obs.shape[0], action_dim)}"
        )
    if not bool(torch.isfinite(actions).all()):
        raise ValueError("the policy returned NaN or infinite actions")
    return actions.detach().float().cpu().numpy()


def rollout(
    policy: Policy,
    tasks: Task | Sequence[Task],
    episodes: int = 1,
    *,
    seed: int = 0,
    max_steps: int | None = None,
    stop_on_success: bool = False,
    render: RenderConfig | None = None,
    num_envs: int = 10,
    asynchronous: bool = False,
    progress: bool = True,
) -> Trajectory:
    """Run ``policy`` for ``episodes`` episodes on each task and return them as one batch.

    Episodes run ``num_envs`` at a time in a Gymnasium vector environment. An episode succeeds
    if the success flag is set at any step (Meta-World's protocol).

    Args:
        policy: Maps ``[B, obs_dim]`` observations to ``[B, act_dim]`` actions. A module is fed on
            its own device and dtype. A policy with ``for_task`` is bound to each episode's task.
        tasks: One task or several; episodes are ordered task by task.
        episodes: Episodes per task.
        seed: Seeds the episodes' resets (see :func:`episode_seeds`).
        max_steps: Cap on episode length (default: the task's own limit).
        stop_on_success: End an episode at its first successful step.
        render: Render frames every ``render.every`` steps, or ``None`` for no frames.
        num_envs: Episodes run side by side.
        asynchronous: Step the environments in worker processes instead of in this one.
        progress: Show a progress bar.

    Returns:
        A :class:`Trajectory` of ``len(tasks) * episodes`` episodes.
    """
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    if not tasks:
        raise ValueError("rollout needs at least one task")
    if episodes <= 0 or num_envs <= 0:
        raise ValueError(f"episodes and num_envs must be positive; got {episodes} and {num_envs}")
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"max_steps must be positive; got {max_steps}")
    slots = [task for task in tasks for _ in range(episodes)]
    seeds = episode_seeds(seed, len(slots))
    placement = policy_placement(policy)
    parts = []
    budget = sum(min(task.max_steps, max_steps or task.max_steps) for task in slots)
    with tqdm(total=budget, unit="step", desc="rollout", disable=not progress, leave=False) as bar:
        for start in range(0, len(slots), num_envs):
            batch = slots[start : start + num_envs]
            collect = partial(_collect, policy, batch, seeds[start : start + num_envs], placement, max_steps, stop_on_success, render, bar)
            parts.append(_with_envs(batch, render, asynchronous, collect))
    return Trajectory.cat(parts)


def _with_envs(batch: list[Task], render: RenderConfig | None, asynchronous: bool, collect) -> Trajectory:
    vector = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    # Autoreset is off: every episode of a batch starts together and is cut to one horizon.
    envs = vector([partial(task.make_env, render) for task in batch], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    try:
        return collect(envs)
    finally:
        envs.close()


def _collect(policy, batch, seeds, placement, max_steps, stop_on_success, render, bar, envs) -> Trajectory:
    n = len(batch)
    horizon = min(task.max_steps for task in batch)
    horizon = min(horizon, max_steps) if max_steps else horizon
    action_space = envs.single_action_space
    obs, info = envs.reset(seed=seeds)
    infos = [
        TaskInfo(
            suite=t.suite,
            family=t.family,
            split=t.split,
            index=t.index,
            suite_seed=t.suite_seed,
            episode_seed=s,
            parameters=tuple(float(g) for g in info["task_parameters"][i]),
            reward_function_version=t.reward_function_version,
        )
        for i, (t, s) in enumerate(zip(batch, seeds))
    ]
    act = _bind(policy, infos)
    observations = np.zeros((n, horizon, obs.shape[1]), dtype=np.float32)
    actions = np.zeros((n, horizon, action_space.shape[0]), dtype=np.float32)
    rewards = np.zeros((n, horizon), dtype=np.float32)
    successes = np.zeros((n, horizon), dtype=bool)
    mask = np.zeros((n, horizon), dtype=bool)
    frames, frame_steps = [], []
    active = np.ones(n, dtype=bool)
    steps = 0
    for t in range(horizon):
        if render is not None and t % render.every == 0:
            frames.append(np.stack([to_chw(f) for f in envs.call("render")]))
            frame_steps.append(t)
        action = np.clip(_act(act, obs, placement, action_space.shape[0]), action_space.low, action_space.high)
        observations[:, t], actions[:, t], mask[:, t] = obs, action, active
        obs, reward, terminated, truncated, step_info = envs.step(action)
        rewards[:, t] = reward
        successes[:, t] = np.asarray(step_info["success"]) > 0
        active &= ~(terminated | truncated | (stop_on_success & successes[:, t]))
        steps = t + 1
        bar.update(n)
        if not active.any():
            break
    frame_tensor = frame_step_tensor = None
    if render is not None:
        frame_tensor = torch.from_numpy(np.stack(frames, axis=1))
        frame_step_tensor = torch.tensor(frame_steps, dtype=torch.int64)
        # Frames after an episode ended show a finished scene; blank them like padded steps.
        lengths = torch.from_numpy(mask.sum(axis=1))
        frame_tensor[frame_step_tensor[None, :] >= lengths[:, None]] = 0
    return Trajectory(
        observations=torch.from_numpy(observations[:, :steps]),
        actions=torch.from_numpy(actions[:, :steps]),
        rewards=torch.from_numpy(rewards[:, :steps]),
        successes=torch.from_numpy(successes[:, :steps]),
        mask=torch.from_numpy(mask[:, :steps]),
        tasks=tuple(infos),
        frames=frame_tensor,
        frame_steps=frame_step_tensor,
    )


def relabel(policy: Policy, trajectory: Trajectory) -> torch.Tensor:
    """``policy``'s actions ``[B, T, act_dim]`` on every state a trajectory visited (zero on padding).

    A policy with ``for_task`` is bound to each episode's task, as in :func:`rollout`; this is how
    an expert labels the states a lesser policy reached (DAgger-style targets).
    """
    act = _bind(policy, trajectory.tasks)
    batch, steps, obs_dim = trajectory.observations.shape
    with torch.no_grad():
        flat = torch.stack([act(trajectory.observations[:, t]) for t in range(steps)], dim=1)
    return flat * trajectory.mask[..., None]
