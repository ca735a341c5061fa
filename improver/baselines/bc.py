"""Filtered behaviour cloning and reward-weighted regression on a policy's own best episodes.

The non-learned baseline: collect episodes with the policy plus Gaussian exploration noise (a
deterministic policy's own actions teach it nothing), weight the episodes by return (keep the top
fraction, or ``softmax(return / temperature)``), and regress the policy onto the weighted actions.
:mod:`improver.baselines.maml` meta-learns the step sizes of this same update.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from improver.tasks import Task, rollout
from improver.types import Trajectory

from . import Checkpoint


class Exploring:
    """``policy``'s actions plus ``N(0, noise^2)``, clipped to ``[-1, 1]``, on the whole batch at once.

    :class:`~improver.augment.noise.NoisyPolicy` binds one copy per episode (so that an episode's
    noise does not depend on its neighbours), which calls the policy once per episode and step;
    here one call per step serves all episodes, several times faster in a rollout, and the
    noise is still reproducible from ``seed`` for the same batch of episodes.
    """

    def __init__(self, policy: nn.Module, noise: float, seed: int) -> None:
        if noise <= 0:
            raise ValueError(f"exploration noise must be positive (a deterministic policy's own actions teach it nothing); got {noise}")
        self.policy, self.noise = policy, noise
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        actions = self.policy(observations)
        return (actions + self.noise * torch.randn(actions.shape, generator=self.generator).to(actions)).clamp(-1.0, 1.0)


def collect_exploring(policy: nn.Module, tasks: Sequence[Task], noise: float, seed: int) -> Trajectory:
    """One episode per entry of ``tasks`` acting with :class:`Exploring` (resets and noise seeded by ``seed``)."""
    return rollout(Exploring(policy, noise, seed), list(tasks), 1, seed=seed, progress=False)


def episode_weights(
    returns: torch.Tensor, weighting: Literal["filter", "rwr"] = "filter", top: float = 0.3, temperature: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Weights ``[B]`` summing to 1 over episodes with returns ``[B]``.

    Args:
        returns: Episode returns.
        weighting: ``"filter"``: equal weight on the best ``ceil(top * B)`` episodes (filtered BC);
            ``"rwr"``: ``softmax(z / temperature)`` with ``z`` the returns standardised within
            the batch (so one temperature fits tasks with different reward scales).
        top: Fraction kept by ``"filter"``.
        temperature: Of ``"rwr"``; may be a tensor that requires grad (MAML learns it).
    """
    if weighting == "filter":
        if not 0 < top <= 1:
            raise ValueError(f"top must be in (0, 1]; got {top}")
        keep = max(1, int(torch.ceil(torch.tensor(top * len(returns)))))
        weights = torch.zeros_like(returns)
        weights[torch.topk(returns, keep).indices] = 1.0 / keep
        return weights
    if weighting == "rwr":
        z = (returns - returns.mean()) / returns.std().clamp_min(1e-6) if len(returns) > 1 else returns * 0
        return torch.softmax(z / temperature, dim=0)
    raise ValueError(f"weighting must be 'filter' or 'rwr'; got {weighting!r}")


def weighted_regression_loss(actions: torch.Tensor, experience: Trajectory, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * mean_t ||actions_it - experience.actions_it||^2`` over the valid steps.

    Args:
        actions: The policy's actions ``[B, T, act_dim]`` on ``experience.observations``.
        experience: The episodes whose actions are the targets.
        weights: Episode weights ``[B]``.
    """
    mask = experience.mask.to(actions)
    per_step = ((actions - experience.actions.to(actions)) ** 2).sum(-1) * mask
    return (weights.to(actions) * per_step.sum(1) / mask.sum(1).clamp_min(1)).sum()


def filtered_bc(
    policy: nn.Module,
    experience: Trajectory,
    weighting: Literal["filter", "rwr"] = "filter",
    top: float = 0.3,
    temperature: float = 1.0,
    epochs: int = 50,
    lr: float = 1e-3,
) -> nn.Module:
    """A copy of ``policy`` regressed onto ``experience``'s actions, episodes weighted by return.

    Full-batch Adam for ``epochs`` steps; ``policy`` itself is not modified.
    """
    weights = episode_weights(experience.returns, weighting, top, temperature)
    improved = copy.deepcopy(policy).train()
    optimizer = torch.optim.Adam(improved.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            weighted_regression_loss(improved(experience.observations), experience, weights).backward()
            optimizer.step()
    return improved.eval()


def bc_steps(
    policy: nn.Module,
    tasks: Sequence[Task],
    steps: int,
    seed: int = 0,
    noise: float = 0.3,
    weighting: Literal["filter", "rwr"] = "filter",
    top: float = 0.3,
    temperature: float = 1.0,
    epochs: int = 50,
    lr: float = 1e-3,
) -> Iterator[Checkpoint]:
    """Filtered BC as an improvement loop: per step, one exploring episode per entry of ``tasks``, then :func:`filtered_bc`.

    Yields the starting policy and then the policy after each of ``steps`` steps.
    """
    env_steps, wall = 0, 0.0
    yield Checkpoint(policy, 0, 0.0)
    for k in range(steps):
        start = time.perf_counter()
        # The same resets as the improver's step-k episodes (improver.loop.improve seeds step k with seed + k).
        experience = collect_exploring(policy, tasks, noise, seed=seed + k)
        policy = filtered_bc(policy, experience, weighting, top, temperature, epochs, lr)
        env_steps += int(experience.lengths.sum())
        wall += time.perf_counter() - start
        yield Checkpoint(policy, env_steps, wall)
