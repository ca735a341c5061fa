"""Task inference: a belief about the hidden task, inferred from experience.

The tasks of a suite differ in hidden parameters (the suites record them as ``TaskInfo.parameters``:
a goal position for Meta-World's ML1 and the toy suite). This module is the only one that
knows what those parameters are; the rest of the package sees a :class:`TaskInference`: a
belief vector ``[belief_dim]`` that the network appends to its context ``z``, its training
loss, the belief that encodes known parameters (for teacher forcing), and a shift of the
belief by an offset in the parameters' own units (for exploration and calibration).

Two implementations:

- :class:`GoalLocator` assumes that rewards fall with the distance between a point of the
  state and a goal, and trilaterates the goal (Meta-World's ML1 families, the toy suite).
- :class:`LearnedTaskEncoder` assumes nothing about what varies: per-step features pooled by
  attention over the real steps, then an MLP to the parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, get_args

import torch
from torch import nn

from .types import TaskInfo

TaskInferenceName = Literal["goal-locator", "learned"]
"""The implementations :func:`make_task_inference` builds."""
TASK_INFERENCE_NAMES: tuple[str, ...] = get_args(TaskInferenceName)
DEFAULT_TASK_INFERENCE: TaskInferenceName = "goal-locator"
"""What a network without a recorded choice uses (every checkpoint written before the choice existed)."""
BOUND = 3.0
"""Largest normalised task parameter an estimate takes (training tasks lie within about 2 units)."""


def task_parameters(info: TaskInfo) -> torch.Tensor:
    """The hidden parameters ``[task_dim]`` (float32, the task's own units) of the task an episode ran on."""
    return torch.tensor(info.parameters, dtype=torch.float32)


class TaskInference(nn.Module, ABC):
    """Experience -> belief ``[belief_dim]`` about the hidden task parameters ``[task_dim]``.

    Beliefs are in normalised units: the task parameters minus ``task_mean``, divided by
    ``task_std`` (buffers set by :meth:`fit_normalization` from the training tasks). Calling the
    module is :meth:`infer`.

    Args:
        task_dim: Number of task parameters (at least 1).
    """

    def __init__(self, task_dim: int) -> None:
        super().__init__()
        if isinstance(task_dim, bool) or not isinstance(task_dim, int) or task_dim < 1:
            raise ValueError(f"task inference needs at least one task parameter; got task_dim={task_dim!r}")
        self.task_dim = task_dim
        self.register_buffer("task_mean", torch.zeros(task_dim))
        self.register_buffer("task_std", torch.ones(task_dim))

    @property
    @abstractmethod
    def belief_dim(self) -> int:
        """Size of the belief appended to ``z``."""

    @abstractmethod
    def infer(self, obs: torch.Tensor, rewards: torch.Tensor, successes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The belief ``[belief_dim]`` from one batch of episodes' steps, flattened.

        Args:
            obs: ``[N, obs_dim]`` normalised states (zeros on padding steps).
            rewards: ``[N]`` scaled rewards.
            successes: ``[N]`` success flags as floats.
            valid: ``[N]`` bool mask of real steps; the others must not change the belief.
        """

    @abstractmethod
    def forced(self, target: torch.Tensor, noise: torch.Tensor | float = 0.0) -> torch.Tensor:
        """The belief ``[..., belief_dim]`` that holds the known normalised parameters ``target``
        ``[..., task_dim]``, plus ``noise`` (broadcast to ``[..., belief_dim]``)."""

    @abstractmethod
    def shifted(self, belief: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """``belief`` ``[..., belief_dim]`` with its estimate moved by ``offset`` ``[task_dim]`` (the parameters' own units)."""

    @abstractmethod
    def estimate(self, belief: torch.Tensor) -> torch.Tensor:
        """The task parameters ``[..., task_dim]`` that ``belief`` ``[..., belief_dim]`` holds, in their own units."""

    def forward(self, obs: torch.Tensor, rewards: torch.Tensor, successes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """:meth:`infer`."""
        return self.infer(obs, rewards, successes, valid)

    def normalize(self, parameters: torch.Tensor) -> torch.Tensor:
        """Task parameters ``[..., task_dim]`` (own units) in normalised units, on this module's device."""
        return (parameters.to(self.task_std) - self.task_mean) / self.task_std

    def fit_normalization(self, parameters: torch.Tensor) -> None:
        """Set ``task_mean`` and ``task_std`` from the training tasks' parameters ``[N, task_dim]``."""
        if parameters.ndim != 2 or parameters.shape[-1] != self.task_dim:
            raise ValueError(f"task inference of {self.task_dim} task parameters; the tasks have parameters of shape {tuple(parameters.shape[1:])}")
        self.task_mean.copy_(parameters.mean(dim=0))
        # One scale for every axis: the goal locator's trilateration needs distances to keep their
        # geometry, and a near-constant coordinate (a table's height) must not become noise.
        self.task_std.fill_(parameters.std(dim=0).mean().clamp(min=1e-2))

    def loss(self, belief: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error of ``belief`` ``[..., belief_dim]`` against the belief that holds ``target`` ``[..., task_dim]`` (normalised)."""
        return nn.functional.mse_loss(belief, self.forced(target.expand(*belief.shape[:-1], -1)))

    def experience_loss(
        self, obs: torch.Tensor, rewards: torch.Tensor, successes: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """The loss of the belief inferred from one experience (inputs as :meth:`infer`'s) against ``target``
        ``[task_dim]`` (normalised), plus ``weight`` times an implementation's own term on the experience
        (none here): what the on-policy refinement fits."""
        return self.loss(self.infer(obs, rewards, successes, valid), target)


class MonotoneDistance(nn.Module):
    """A distance that falls as the reward rises: a positive sum of softplus ramps in ``-reward``.

    Without the constraint, meta-training settles on maps that turn the geometry inside out
    (measured: distance rising with reward, held-out error 0.15 against 0.02 with the right map).
    """

    def __init__(self, ramps: int = 16) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(ramps))
        self.offset = nn.Parameter(torch.linspace(-2.0, 2.0, ramps))
        self.slope = nn.Parameter(torch.zeros(ramps))

    def forward(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[N]`` scaled rewards -> ``[N]`` non-negative distances."""
        ramps = nn.functional.softplus(self.offset - nn.functional.softplus(self.slope) * rewards[..., None])
        return ramps @ nn.functional.softplus(self.scale) / len(self.scale)


class GoalLocator(TaskInference):
    """Infers a hidden goal ``[task_dim]`` (normalised) from visited states and their rewards.

    Meta-World's ML1 tasks differ only in a goal position, and their rewards fall with the
    distance between a point of the state (the hand, the object) and that goal. Each step
    therefore gives a point ``p_i`` (a learned projection of its state), a squared distance
    ``d_i`` (a learned map of its reward and success flag) and a weight; the goal is the
    weighted least-squares solution of ``|p_i - g|^2 = d_i^2`` (trilateration, linear after
    subtracting the weighted mean), regularised toward a vote: the point of the best steps, by a
    softmax whose logits rise with the reward. The belief is both, ``[2 * task_dim]``, and both
    are supervised; the vote's plain signal is what steers the point projection the right way
    round (without it meta-training found a mirrored projection, held-out error 0.35 against 0.045).
    Every learned part sees one step's own inputs only: measured on the toy suite, estimates
    computed from the transformer's features memorise the few training goals (held-out error
    0.17 against 0.05).
    """

    def __init__(self, obs_dim: int, task_dim: int) -> None:
        super().__init__(task_dim)
        self.point = nn.Linear(obs_dim, task_dim)
        self.distance = MonotoneDistance()
        # Logits of each step's weight in the least squares and in the vote.
        self.fit_weights = nn.Linear(obs_dim + 2, 1)
        # The vote goes to the best steps: its logits rise with the reward (and the success flag),
        # and must be able to become sharp (one step out of hundreds) within a short run.
        self.vote_slope = nn.Parameter(torch.tensor(3.0))
        self.vote_success = nn.Parameter(torch.tensor(0.0))
        self.log_ridge = nn.Parameter(torch.tensor(-3.0))

    @property
    def belief_dim(self) -> int:
        """The goal estimate and the vote: ``2 * task_dim``."""
        return 2 * self.task_dim

    def infer(self, obs: torch.Tensor, rewards: torch.Tensor, successes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The goal estimate and the vote, ``[2 * task_dim]`` (see :meth:`TaskInference.infer`)."""
        signal = torch.stack([rewards, successes], dim=-1)
        points = self.point(obs)
        squared = self.distance(rewards) ** 2
        vote = self.vote_slope.exp() * rewards + self.vote_success * successes
        logits = torch.stack([self.fit_weights(torch.cat([obs, signal], dim=-1)).squeeze(-1), vote], dim=-1)
        fit, vote = logits.masked_fill(~valid[:, None], float("-inf")).softmax(dim=0).unbind(-1)
        prior = vote @ points
        centred = points - fit @ points
        norms = (points * points).sum(dim=-1) - squared
        design = 2.0 * centred
        target = norms - fit @ norms
        eye = torch.eye(points.shape[-1], dtype=points.dtype, device=points.device)
        ridge = self.log_ridge.exp()
        gram = design.T @ (fit[:, None] * design) + ridge * eye
        estimate = torch.linalg.solve(gram, design.T @ (fit * target) + ridge * prior)
        # Goals are normalised, so training goals lie within about 2 units. Visited points that
        # are nearly collinear make the solve ill-conditioned (measured: an estimate 1.7 m off on
        # a reach-v3 task); bounding it keeps such an estimate in the task's range.
        return torch.cat([BOUND * torch.tanh(estimate / BOUND), prior])

    def forced(self, target: torch.Tensor, noise: torch.Tensor | float = 0.0) -> torch.Tensor:
        """The goal as both estimate and vote, plus ``noise``."""
        return torch.cat([target, target], dim=-1) + noise

    def shifted(self, belief: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Estimate and vote both moved by ``offset``."""
        shift = offset.to(belief) / self.task_std
        return belief + torch.cat([shift, shift], dim=-1)

    def estimate(self, belief: torch.Tensor) -> torch.Tensor:
        """The goal estimate, in the goal's units."""
        return belief[..., : self.task_dim] * self.task_std + self.task_mean

    def experience_loss(
        self, obs: torch.Tensor, rewards: torch.Tensor, successes: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """:meth:`TaskInference.experience_loss` plus ``weight`` times the mean squared distance of the
        success steps' points from the goal.

        Where the success flag is set the object is at the goal, so the point of that step should
        be the goal. Without this term the learned projection shrank toward the goals' mean
        (push-v3: a puck 6 cm from the middle got a point 2.8 cm from it; held-out goal error from
        step-3 loop episodes 0.047 m without, 0.031 m with).
        """
        error = self.loss(self.infer(obs, rewards, successes, valid), target)
        points = self.point(obs[(successes > 0) & valid])
        if len(points):
            error = error + weight * ((points - target) ** 2).sum(dim=-1).mean()
        return error


class LearnedTaskEncoder(TaskInference):
    """Infers the task parameters ``[task_dim]`` (normalised) with no assumption about what they are.

    A small MLP turns each step's own inputs (normalised state, scaled reward, success flag)
    into a feature; per attention head, logits from the features pick the informative steps
    (a softmax over the real steps) and the features' values are pooled by them; an MLP maps the
    pooled values to the estimate, which is the belief. Like the goal locator's, every per-step
    part sees one step only: estimates from the transformer's features memorise the few
    training tasks (see :class:`GoalLocator`).

    Args:
        obs_dim: Observation size.
        task_dim: Number of task parameters.
        width: Feature width (a multiple of ``heads``).
        heads: Attention heads of the pooling.
    """

    def __init__(self, obs_dim: int, task_dim: int, width: int = 64, heads: int = 4) -> None:
        super().__init__(task_dim)
        if width % heads:
            raise ValueError(f"LearnedTaskEncoder width ({width}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.features = nn.Sequential(nn.Linear(obs_dim + 2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.logits = nn.Linear(width, heads)
        self.values = nn.Linear(width, width)
        self.out = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, task_dim))

    @property
    def belief_dim(self) -> int:
        """The estimate: ``task_dim``."""
        return self.task_dim

    def infer(self, obs: torch.Tensor, rewards: torch.Tensor, successes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The estimate ``[task_dim]`` (see :meth:`TaskInference.infer`)."""
        features = self.features(torch.cat([obs, rewards[:, None], successes[:, None]], dim=-1))  # [N, width]
        weights = self.logits(features).masked_fill(~valid[:, None], float("-inf")).softmax(dim=0)  # [N, heads]
        # A padding step's value is zeroed, not only weighted by 0: 0 * inf would be NaN.
        values = torch.where(valid[:, None], self.values(features), 0.0).unflatten(-1, (self.heads, -1))  # [N, heads, width / heads]
        pooled = torch.einsum("nh,nhd->hd", weights, values).flatten()
        return BOUND * torch.tanh(self.out(pooled) / BOUND)

    def forced(self, target: torch.Tensor, noise: torch.Tensor | float = 0.0) -> torch.Tensor:
        """``target`` plus ``noise``."""
        return target + noise

    def shifted(self, belief: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The estimate moved by ``offset``."""
        return belief + offset.to(belief) / self.task_std

    def estimate(self, belief: torch.Tensor) -> torch.Tensor:
        """The estimate in the parameters' own units."""
        return belief * self.task_std + self.task_mean


def make_task_inference(name: str, obs_dim: int, task_dim: int, width: int = 64, heads: int = 4) -> TaskInference:
    """The task inference called ``name`` (one of :data:`TaskInferenceName`) for ``obs_dim``-d states and ``task_dim`` parameters.

    ``width`` and ``heads`` size the learned encoder (the network's own).
    """
    if name == "goal-locator":
        return GoalLocator(obs_dim, task_dim)
    if name == "learned":
        return LearnedTaskEncoder(obs_dim, task_dim, width, heads)
    raise ValueError(f"unknown task inference {name!r}; choose one of {list(TASK_INFERENCE_NAMES)}")
