"""Core records shared by every layer: what a task is, what a policy is, what experience is."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import torch


class TaskInfo(NamedTuple):
    """What is known about the task an episode ran on. The learner never sees its parameters.

    Attributes:
        suite: Suite name, e.g. ``"ML1:push-v3"``.
        family: Task family, e.g. ``"push-v3"``.
        split: ``"train"`` or ``"test"``.
        index: Index of the task inside its split.
        suite_seed: Seed the suite was built with.
        episode_seed: Seed of this episode's reset.
        parameters: The task's hidden parameters (Meta-World's ML1 and the toy suite: a target
            position), absent from the learner's observations; the env's reset info
            ``"task_parameters"`` (``()``: unknown).
        reward_function_version: Meta-World's reward version (``"toy"`` for toy suites).
    """

    suite: str
    family: str
    split: str
    index: int
    suite_seed: int
    episode_seed: int
    parameters: tuple[float, ...]
    reward_function_version: str


@runtime_checkable
class Policy(Protocol):
    """Anything that maps a batch of observations ``[B, obs_dim]`` to actions ``[B, act_dim]``.

    A plain ``torch.nn.Module``, a function or a scripted expert all qualify; nothing to inherit.
    A policy that needs to know its task (a scripted expert reads the task's hidden parameters) may also
    define ``for_task(info: TaskInfo) -> Policy``; the rollout collector then calls it once per
    episode and acts with the returned policy.
    """

    def __call__(self, observations: torch.Tensor) -> torch.Tensor: ...


VALUE_LIMIT = 1e6
"""Largest magnitude an observation, action or reward may have on a real step. Meta-World's
are within about 10; a larger one means a broken environment or policy, and the improver's
float32 arithmetic (squares of normalised states) would overflow on it."""


@dataclass(frozen=True)
class Trajectory:
    """A batch of episodes, padded to a common length.

    Attributes:
        observations: ``[B, T, obs_dim]`` float32, what the learner saw (task parameters hidden).
        actions: ``[B, T, act_dim]`` float32.
        rewards: ``[B, T]`` float32, or ``None`` for reward-free experience.
        successes: ``[B, T]`` bool, the environment's success flag per step.
        mask: ``[B, T]`` bool, True on real steps; each row is a prefix of Trues. On real steps
            observations, actions and rewards must be finite and within ``VALUE_LIMIT``; padding
            steps may hold anything (NaN too) and never reach a network.
        tasks: One :class:`TaskInfo` per episode.
        frames: Optional ``[B, F, C, H, W]`` uint8 frames, rendered every few steps.
        frame_steps: ``[F]`` int64 step index of each frame (required with ``frames``).
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor | None
    successes: torch.Tensor
    mask: torch.Tensor
    tasks: tuple[TaskInfo, ...]
    frames: torch.Tensor | None = None
    frame_steps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        obs, act = self.observations, self.actions
        if obs.ndim != 3 or act.ndim != 3:
            raise ValueError(
                f"observations and actions must be [episodes, steps, dim]; got {tuple(obs.shape)} and {tuple(act.shape)}"
            )
        batch, steps = obs.shape[:2]
        if batch == 0 or steps == 0:
            raise ValueError(f"a Trajectory needs at least one episode and one step; got shape {tuple(obs.shape)}")
        expected = {"actions": act, "successes": self.successes, "mask": self.mask}
        if self.rewards is not None:
            expected["rewards"] = self.rewards
        for name, value in expected.items():
            if tuple(value.shape[:2]) != (batch, steps):
                raise ValueError(f"{name} has shape {tuple(value.shape)}; expected leading dims {(batch, steps)}")
        for name in ("rewards", "successes", "mask"):
            value = getattr(self, name)
            if value is not None and value.ndim != 2:
                raise ValueError(f"{name} must be [episodes, steps]; got {tuple(value.shape)}")
        if self.successes.dtype != torch.bool or self.mask.dtype != torch.bool:
            raise ValueError("successes and mask must be bool tensors")
        # A valid mask is a run of Trues followed by Falses, starting with at least one True.
        if not bool(self.mask[:, 0].all()) or bool((self.mask[:, 1:] & ~self.mask[:, :-1]).any()):
            raise ValueError("mask must mark a non-empty prefix of each episode")
        for name in ("observations", "actions", "rewards"):
            self._check_bounded(name)
        if len(self.tasks) != batch:
            raise ValueError(f"got {len(self.tasks)} task infos for {batch} episodes")
        self._check_frames(batch)

    def _check_bounded(self, name: str) -> None:
        """Refuse NaN, infinite and out-of-range (beyond ``VALUE_LIMIT``) values of ``name`` on real steps."""
        value = getattr(self, name)
        if value is None:
            return
        # ``<=`` is False for NaN, so one comparison catches NaN, infinities and huge values.
        bad = ~(value.abs() <= VALUE_LIMIT)
        bad &= self.mask.view(*self.mask.shape, *(1,) * (value.ndim - 2))
        if bool(bad.any()):
            where = tuple(bad.nonzero()[0].tolist())
            raise ValueError(
                f"{name}[{', '.join(map(str, where))}] (episode {where[0]}, step {where[1]}) is {value[where].item()}: real steps "
                f"(mask True) must hold finite values within +-{VALUE_LIMIT:g}; fix or drop that episode "
                "(padding steps, mask False, may hold anything)"
            )

    def _check_frames(self, batch: int) -> None:
        if self.frames is None and self.frame_steps is None:
            return
        if self.frames is None or self.frame_steps is None:
            raise ValueError("frames and frame_steps must be given together")
        if self.frames.dtype != torch.uint8 or self.frames.ndim != 5:
            raise ValueError(f"frames must be uint8 [B, F, C, H, W]; got {self.frames.dtype} {tuple(self.frames.shape)}")
        if self.frames.shape[0] != batch or self.frame_steps.shape != (self.frames.shape[1],):
            raise ValueError(
                f"frames {tuple(self.frames.shape)} and frame_steps {tuple(self.frame_steps.shape)} do not match {batch} episodes"
            )

    @property
    def num_episodes(self) -> int:
        """Number of episodes ``B``."""
        return self.observations.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` int64 number of real steps per episode."""
        return self.mask.sum(dim=1)

    @property
    def success(self) -> torch.Tensor:
        """``[B]`` bool: Meta-World's protocol, success flag set at any real step."""
        return (self.successes & self.mask).any(dim=1)

    @property
    def returns(self) -> torch.Tensor:
        """``[B]`` float32 undiscounted return over real steps."""
        if self.rewards is None:
            raise ValueError("this Trajectory is reward-free; it has no returns")
        return torch.where(self.mask, self.rewards, 0.0).sum(dim=1)  # padding may hold NaN

    def to(self, device: torch.device | str) -> Trajectory:
        """Return a copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def take(self, episodes: Sequence[int] | torch.Tensor) -> Trajectory:
        """The given episodes (indices or a bool mask over episodes), in that order."""
        idx = torch.as_tensor(episodes)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long()
        picked = {
            f.name: getattr(self, f.name)[idx]
            for f in fields(self)
            if f.name != "frame_steps" and isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, tasks=tuple(self.tasks[i] for i in idx.tolist()), **picked)

    @staticmethod
    def cat(parts: Sequence[Trajectory]) -> Trajectory:
        """Concatenate along episodes, padding steps (and frames) to the longest part."""
        if not parts:
            raise ValueError("cannot concatenate an empty list of trajectories")
        steps = max(p.observations.shape[1] for p in parts)
        if len({p.rewards is None for p in parts}) > 1:
            raise ValueError("cannot concatenate reward-free and rewarded trajectories")
        if len({p.frames is None for p in parts}) > 1:
            raise ValueError("cannot concatenate trajectories with and without frames")
        frames = frame_steps = None
        if parts[0].frames is not None:
            frame_steps = max((p.frame_steps for p in parts), key=len)
            if any(not torch.equal(p.frame_steps, frame_steps[: len(p.frame_steps)]) for p in parts):
                raise ValueError("cannot concatenate trajectories rendered at different frame strides")
            frames = torch.cat([_pad_dim1(p.frames, len(frame_steps)) for p in parts])

        def stack(name: str) -> torch.Tensor:
            return torch.cat([_pad_dim1(getattr(p, name), steps) for p in parts])

        return Trajectory(
            observations=stack("observations"),
            actions=stack("actions"),
            rewards=None if parts[0].rewards is None else stack("rewards"),
            successes=stack("successes"),
            mask=stack("mask"),
            tasks=tuple(t for p in parts for t in p.tasks),
            frames=frames,
            frame_steps=frame_steps,
        )


def _pad_dim1(t: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad dimension 1 of ``t`` up to ``size``."""
    extra = size - t.shape[1]
    return torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], dim=1) if extra else t
