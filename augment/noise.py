"""Seeded action noise for any policy: epsilon-greedy, Gaussian and Ornstein-Uhlenbeck.

Noise is drawn from a ``torch.Generator``. Inside :func:`improver.tasks.rollout` a
:class:`NoisyPolicy` is bound to each episode (``for_task``) with a generator seeded from its
own seed and the episode's seed, so an episode's noise does not depend on which other episodes
ran beside it: data generation is reproducible and resumable.

:class:`ExplorationNoise` is the improvement loop's exploration noise, public so that a collection
loop of your own (Meta-World's evaluation harness, an SB3 callback, ...) gets the same noisy actions.
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

    def for_episode(self, episode_seed: int) -> NoisyPolicy:
        """A fresh copy for one episode whose noise is seeded by ``episode_seed``, as :meth:`for_task` seeds
        it; the inner policy is not bound to a task (for a policy that needs none)."""
        return NoisyPolicy(self.policy, self.noises, derive_seed(self.seed, episode_seed))

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        # The inner policy may live on another device or dtype than the float32 CPU batch it gets.
        actions = self.policy(observations.to(*placement(self.policy))).to(observations)
        for i, noise in enumerate(self.noises):
            actions, self.states[i] = noise(actions, self.generator, self.states[i])
        return actions.clamp(-1.0, 1.0)


@dataclass(frozen=True)
class ExplorationNoise:
    """The improvement loop's exploration noise, for the loop itself and for collection loops of your own.

    Each action component gets ``N(0, std^2)`` added, then actions are clipped to ``[-1, 1]``; the noise
    of an episode comes from a generator seeded by ``seed`` and the episode's seed, so it does not depend
    on the episodes beside it. Step ``k`` of ``improvement_loop(..., seed=s, exploration=std)`` collects
    with ``ExplorationNoise(std, s + k).wrap(policy)``, which :func:`improver.tasks.rollout` binds to each
    episode. A loop of your own binds it with :meth:`for_episode` and calls the result once per step::

        noise = ExplorationNoise(std=0.3, seed=0)
        for episode in range(10):
            act = noise.for_episode(policy, episode_seed=episode)
            obs, _ = env.reset()
            done = False
            while not done:
                with torch.no_grad():
                    action = act(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()  # [act_dim]
                obs, reward, terminated, truncated, info = env.step(action)
                done = terminated or truncated

    Given the same observations, that episode's actions are bit for bit those ``rollout`` takes with
    ``noise.wrap(policy)`` on an episode whose seed (``TaskInfo.episode_seed``) is ``episode_seed``.

    Attributes:
        std: Standard deviation of the noise, in action units (actions span ``[-1, 1]``); 0: no noise.
        seed: Seed of the noise, mixed with each episode's seed.
    """

    std: float
    seed: int = 0

    def __post_init__(self) -> None:
        _check_level("std", self.std)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")

    def wrap(self, policy: Policy) -> Policy:
        """``policy`` with this noise, for :func:`improver.tasks.rollout` (which binds it to each episode
        through ``for_task``); ``policy`` itself when ``std`` is 0."""
        return NoisyPolicy(policy, Gaussian(self.std), seed=self.seed) if self.std else policy

    def for_episode(self, policy: Policy, episode_seed: int) -> Policy:
        """``policy`` with the noise of one episode: call it once per step on ``[1, obs_dim]`` observations
        (``[B, obs_dim]`` draws ``[B, act_dim]`` noise from the one episode's stream); ``policy`` itself when
        ``std`` is 0. A policy that needs its task (``for_task``) must be bound to it first."""
        noisy = self.wrap(policy)
        return noisy.for_episode(episode_seed) if isinstance(noisy, NoisyPolicy) else noisy
