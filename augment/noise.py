"""Seeded action noise for any policy: epsilon-greedy, Gaussian and Ornstein-Uhlenbeck.

Noise is drawn from a ``torch.Generator``. Inside :func:`improver.tasks.rollout` a
:class:`NoisyPolicy` is bound to each episode (``for_task``) with a generator seeded from its
own seed and the episode's seed, so an episode's noise does not depend on which other episodes
ran beside it: data generation is reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from improver.policies import placement
from improver.types import Policy, TaskInfo


class Noise(Protocol):
    """Perturbs a batch of actions ``[B, act_dim]`` in ``[-1, 1]``; ``state`` carries temporal noise."""

    def __call__(
        self, actions: torch.Tensor, generator: torch.Generator, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def _check_level(name: str, value: float, upper: float | None = None) -> None:
    if not np.isfinite(value) or value < 0 or (upper is not None and value > upper):
        bound = f"[0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be in {bound}; got {value}")


@dataclass(frozen=True)
class EpsilonGreedy:
    """With probability ``epsilon`` per step, replace the action by a uniform random one (D-REX)."""

    epsilon: float

    def __post_init__(self) -> None:
        _check_level("epsilon", self.epsilon, 1.0)

    def __call__(self, actions, generator, state):
        random = torch.rand(actions.shape, generator=generator) * 2 - 1
        replace = torch.rand((actions.shape[0], 1), generator=generator) < self.epsilon
        return torch.where(replace, random.to(actions), actions), state


@dataclass(frozen=True)
class Gaussian:
    """Add ``N(0, sigma^2)`` to every action component."""

    sigma: float

    def __post_init__(self) -> None:
        _check_level("sigma", self.sigma)

    def __call__(self, actions, generator, state):
        return actions + self.sigma * torch.randn(actions.shape, generator=generator).to(actions), state


@dataclass(frozen=True)
class OrnsteinUhlenbeck:
    """Temporally correlated noise ``x <- x - theta * x + sigma * N(0, 1)``, added to the actions."""

    sigma: float
    theta: float = 0.15

    def __post_init__(self) -> None:
        _check_level("sigma", self.sigma)
        _check_level("theta", self.theta, 1.0)

    def __call__(self, actions, generator, state):
        if state is None or state.shape != actions.shape:
            state = torch.zeros(actions.shape)
        state = state - self.theta * state + self.sigma * torch.randn(actions.shape, generator=generator)
        return actions + state.to(actions), state


NOISES = {"epsilon": EpsilonGreedy, "gaussian": Gaussian, "ou": OrnsteinUhlenbeck}


def make_noise(kind: str, level: float) -> Noise:
    """Noise of ``kind`` (``epsilon``, ``gaussian`` or ``ou``) at ``level``."""
    if kind not in NOISES:
        raise ValueError(f"unknown noise {kind!r}; choose one of {sorted(NOISES)}")
    return NOISES[kind](level)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from ``parts``, identical in every process."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class NoisyPolicy:
    """``policy`` with ``noises`` applied in order, then clipped to ``[-1, 1]``. Wrappers compose.

    Args:
        policy: Any policy; if it has ``for_task`` (a scripted expert), binding is passed through.
        noises: One noise or several, applied in order.
        seed: Seed of the noise (mixed with each episode's seed when bound to an episode).
    """

    def __init__(self, policy: Policy, noises: Noise | Sequence[Noise], seed: int = 0) -> None:
        self.policy = policy
        self.noises = tuple(noises) if isinstance(noises, Sequence) else (noises,)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(derive_seed(seed))
        self.states: list[torch.Tensor | None] = [None] * len(self.noises)

    def for_task(self, info: TaskInfo) -> NoisyPolicy:
        """A fresh copy for one episode: inner policy bound to the task, noise seeded by the episode."""
        inner = self.policy.for_task(info) if hasattr(self.policy, "for_task") else self.policy
        return NoisyPolicy(inner, self.noises, derive_seed(self.seed, info.episode_seed))

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        # The inner policy may live on another device or dtype than the float32 CPU batch it gets.
        actions = self.policy(observations.to(*placement(self.policy))).to(observations)
        for i, noise in enumerate(self.noises):
            actions, self.states[i] = noise(actions, self.generator, self.states[i])
        return actions.clamp(-1.0, 1.0)
