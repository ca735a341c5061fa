"""Rollout throughput: raw Meta-World stepping vs. the collector, and render rates.

Every figure is a ratio against a baseline measured in the same run, because this machine is
shared and noisy.
"""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import version
from typing import Any

import torch

from improver.policies import MLPPolicy

from .registry import make_suite
from .rendering import RenderConfig
from .rollout import rollout


def _seeded_mlp(obs_dim: int, act_dim: int, seed: int) -> MLPPolicy:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLPPolicy(obs_dim, act_dim).eval()


def _raw_steps_per_second(env: Any, policy: MLPPolicy, steps: int) -> float:
    """A plain loop over one bare Meta-World env with the same policy: the baseline."""
    obs, _ = env.reset()
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            action = policy(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
            obs, _, _, truncated, _ = env.step(action)
            if truncated:
                obs, _ = env.reset()
    return steps / (time.perf_counter() - start)


def _render_fps(task: Any, config: RenderConfig, frames: int) -> float:
    env = task.make_env(config)
    try:
        env.reset(seed=0)
        env.render()  # the first frame pays for the GL context
        start = time.perf_counter()
        for _ in range(frames):
            env.render()
        return frames / (time.perf_counter() - start)
    finally:
        env.close()


def bench_rollout(family: str = "push-v3", episodes: int = 4, frames: int = 60, seed: int = 0) -> dict[str, Any]:
    """Measure steps/s of a bare env loop and of :func:`rollout`, and 64x64 render rates.

    Args:
        family: Meta-World task family (its first held-out ML1 task is used).
        episodes: Episodes of 500 steps per collector measurement.
        frames: Frames per render measurement.
        seed: Seed of the suite and of the MLP policy's weights.

    Returns:
        A JSON-ready dict of figures, ratios and versions.
    """
    suite = make_suite(f"ML1:{family}", seed)
    task = suite.tasks("test")[0]
    policy = _seeded_mlp(suite.observation_dim, suite.action_dim, seed)
    steps = episodes * task.max_steps

    env = task.make_env()
    try:
        raw = _raw_steps_per_second(env.unwrapped, policy, steps)
    finally:
        env.close()

    def collector(**kwargs: Any) -> float:
        rollout(policy, task, 1, max_steps=1, progress=False, **kwargs)  # warm: envs are built once, then reused
        start = time.perf_counter()
        traj = rollout(policy, task, episodes, seed=seed, progress=False, **kwargs)
        return float(traj.lengths.sum()) / (time.perf_counter() - start)

    one_env = collector(num_envs=1)
    batched = collector(num_envs=episodes)
    two_workers = collector(num_envs=2, asynchronous=True)
    default_fps = _render_fps(task, RenderConfig(size=64, fast=False), frames)
    fast_fps = _render_fps(task, RenderConfig(size=64, fast=True), frames)
    return {
        "task": f"ML1:{family} test[0]",
        "policy": "MLPPolicy(39->64->64->4)",
        "steps_per_measurement": steps,
        "raw_env_steps_per_s": raw,
        "collector_steps_per_s": {"sync_1_env": one_env, f"sync_{episodes}_envs": batched, "async_2_workers": two_workers},
        "collector_to_raw": {"sync_1_env": one_env / raw, f"sync_{episodes}_envs": batched / raw, "async_2_workers": two_workers / raw},
        "render_fps_64px": {"default_settings": default_fps, "fast_settings": fast_fps},
        "render_speedup": fast_fps / default_fps,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "versions": {p: version(p) for p in ("metaworld", "mujoco", "gymnasium", "torch")},
    }
