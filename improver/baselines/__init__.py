"""Contenders the improver is benchmarked against (``improver bench improve``), one per module.

- :mod:`~improver.baselines.ppo`: stable-baselines3 PPO fine-tuning the starting policy.
- :mod:`~improver.baselines.maml`: MAML-style gradient adaptation (Meta-SGD step sizes, ``higher``).
- :mod:`~improver.baselines.l2l`: learn2learn's MAML and Meta-SGD on the same data, losses and loops.
- :mod:`~improver.baselines.bc`: filtered behaviour cloning / reward-weighted regression on the
  policy's own best episodes (not learned).

Each contender is a generator of :class:`Checkpoint` objects: the starting policy first, then one
per improvement step (and, for PPO, optional later checkpoints). The benchmark evaluates every
checkpoint the same way, so all contenders are scored on the same episodes (same tasks and seeds).
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Checkpoint(NamedTuple):
    """A contender's policy after it has learned from ``env_steps`` environment steps.

    Attributes:
        policy: Maps observations ``[B, obs_dim]`` to actions ``[B, act_dim]``; evaluated before
            the contender goes on, so it may be a live view of a model that keeps training.
        env_steps: Environment steps of experience used so far (evaluation episodes excluded).
        wall_s: Wall time spent learning so far (collection and updates; evaluation excluded).
    """

    policy: Any
    env_steps: int
    wall_s: float


__all__ = ["Checkpoint"]
