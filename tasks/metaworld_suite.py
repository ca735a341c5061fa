"""Meta-World suites (ML1, ML10, ML45, MT10, MT50) behind the rollout contract of ``Task``.

Built from ``metaworld.ML1/ML10/...`` and ``set_task``, never ``gym.make``: upstream's
``Meta-World/ML1-train`` fails and vectorised ML1 silently uses test goals (issues 541, 573).
ML suites hide the goal from the observation as the benchmark does; the scripted experts get
it from the task record instead.
"""

from __future__ import annotations

import atexit
import warnings
from collections import defaultdict
from functools import partial
from typing import Any, Collection

import gymnasium as gym
import numpy as np
import torch

from improver.types import TaskInfo

from .rendering import RenderConfig, configure_gl_backend, prepare_mujoco_env
from .suite import Suite, Task

OBSERVATION_DIM = 39
ACTION_DIM = 4
GOAL_SLICE = slice(36, 39)


def _metaworld() -> Any:
    # The GL backend must be chosen before mujoco is first imported.
    configure_gl_backend()
    import metaworld

    return metaworld


# Building a Meta-World env compiles its MuJoCo model (about 0.15 s, as long as 120 steps), so
# closed envs wait here, by family and render settings, for the next rollout to `set_task` them.
_IDLE_ENVS: dict[tuple[str, RenderConfig | None], list[Any]] = defaultdict(list)
IDLE_ENVS_PER_KEY = 16


@atexit.register
def _close_idle_envs() -> None:
    # Free GL contexts while the GL library is still loaded; at interpreter teardown it is not.
    for idle in _IDLE_ENVS.values():
        while idle:
            idle.pop().close()


class MetaWorldTaskEnv(gym.Wrapper):
    """Makes a Meta-World env follow the ``Task`` contract.

    ``reset(seed=...)`` seeds the env through ``env.seed`` (Meta-World ignores the reset seed),
    observations are float32, the reset info carries ``"task_parameters"`` (the goal), and step infos are cut down to
    ``"success"`` so that vector environments do not spend time merging unused keys.
    ``close()`` hands the bare env back for reuse.
    """

    def __init__(self, env: Any, key: tuple[str, RenderConfig | None]) -> None:
        super().__init__(env)
        self._key = key

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.env.unwrapped.seed(seed)
        obs, _ = self.env.reset()
        goal = np.asarray(self.env.unwrapped._get_pos_goal(), dtype=np.float32).copy()
        return obs.astype(np.float32), {"task_parameters": goal}

    def step(self, action: np.ndarray):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs.astype(np.float32), float(reward), terminated, truncated, {"success": float(info["success"])}

    def close(self) -> None:
        idle = _IDLE_ENVS[self._key]
        if len(idle) < IDLE_ENVS_PER_KEY:
            idle.append(self.env.unwrapped)
        else:
            self.env.close()


def _new_env(family: str, render: RenderConfig | None) -> Any:
    cls = _metaworld().env_dict.ALL_V3_ENVIRONMENTS[family]
    if render is None:
        return cls()
    env = cls(render_mode="rgb_array", width=render.size, height=render.size, camera_name=render.camera)
    prepare_mujoco_env(env, render)
    return env


def _build(family: str, mw_task: Any, render: RenderConfig | None) -> MetaWorldTaskEnv:
    key = (family, render)
    env = _IDLE_ENVS[key].pop() if _IDLE_ENVS[key] else _new_env(family, render)
    env.set_task(mw_task)
    return MetaWorldTaskEnv(env, key)


# Meta-World's reach policy moves the hand body onto the goal, but reach success is measured at
# the fingertips' centre, 4.5 cm below the hand, within 5 cm of the goal: the scripted expert
# succeeds with 0.5 cm to spare, and an imitation of it 1 cm off fails (measured: the improver's
# head given the true goal reached 2/7 held-out goals). Aiming the fingertips leaves 5 cm.
AIM_OFFSET = {"reach-v3": np.array([0.0, 0.0, 0.045])}


def _ramp(x: float, start: float, end: float) -> float:
    """0 at ``start``, 1 at ``end``, linear between and flat outside."""
    return float(np.clip((x - start) / (end - start), 0.0, 1.0))


class SmoothPushPolicy:
    """Meta-World's push policy with its switches replaced by ramps.

    The scripted policy hovers 20 cm above the puck until the hand is within 2 cm of it in xy,
    then drops, then pushes: three phases split by thresholds, so its action jumps by up to
    1.7 at a 1 mm change of state. A learned imitation smooths the jump and hovers for ever
    (measured: the improver's head, fed the true goal, parked above the puck on 4/4 held-out
    goals, return about 40 of 4,000). Here the height and the pull toward the goal change
    continuously with the hand's distance to the puck, and actions are clipped to the env's range.
    """

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        """One ``[4]`` action (3-d hand motion, grip effort) for one observation with the goal in it."""
        hand, puck, goal = obs[:3], obs[4:7] + np.array([-0.005, 0.0, 0.0]), obs[GOAL_SLICE]
        off_xy = float(np.linalg.norm(hand[:2] - puck[:2]))
        above = float(hand[2] - puck[2])
        over = 1.0 - _ramp(off_xy, 0.02, 0.05)  # 1 when the hand is over the puck
        approach = puck + np.array([0.0, 0.0, 0.03 + 0.17 * (1.0 - over)])
        push = over * (1.0 - _ramp(above, 0.05, 0.08))  # over the puck and low: push it to the goal
        target = (1.0 - push) * approach + push * goal
        grip = 0.6 * over * (1.0 - _ramp(above, 0.10, 0.14))
        return np.clip(np.append(10.0 * (target - hand), grip), -1.0, 1.0)


class SmoothPickPlacePolicy:
    """Meta-World's pick-place policy with its switches replaced by ramps.

    The scripted policy hovers 10 cm above the object until the hand is within 2 cm of it in xy,
    drops, closes the gripper once the hand is within 7 cm, waits until the fingers are closer
    than 0.73 apart, then carries the object to the goal. A learned imitation of it hovered
    8.3-8.6 cm from the object with the gripper open (measured: the improver's head, fed the true
    goal, 0/10 held-out goals). Here the height, the grip and the pull toward the goal change
    continuously with the hand's offset from the object and with the fingers' opening
    (``obs[3]``: 1.0 open, about 0.45 closed on the object).
    """

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        """One ``[4]`` action (3-d hand motion, grip effort) for one observation with the goal in it."""
        hand, fingers, puck, goal = obs[:3], float(obs[3]), obs[4:7] + np.array([-0.005, 0.0, 0.0]), obs[GOAL_SLICE]
        over = 1.0 - _ramp(float(np.linalg.norm(hand[:2] - puck[:2])), 0.02, 0.05)  # 1 when the hand is over the object
        approach = puck + np.array([0.0, 0.0, 0.03 + 0.12 * (1.0 - over)])
        grip = over * (1.0 - _ramp(float(hand[2] - puck[2]), 0.06, 0.09))  # over the object and low: close
        held = 1.0 - _ramp(fingers, 0.5, 0.7)  # fingers closed on it: carry it to the goal
        target = (1.0 - held) * approach + held * goal
        return np.clip(np.append(10.0 * (target - hand), grip), -1.0, 1.0)


# Families whose scripted policy is replaced by a smoother one that reaches the same goal.
SMOOTH_POLICIES = {"push-v3": SmoothPushPolicy, "pick-place-v3": SmoothPickPlacePolicy}

# The observation's positions a scripted policy reads: the hand, the first object and the second
# object (zero in one-object families); smoothing perturbs these, never the goal or the quaternions.
POSITION_COORDINATES = np.r_[0:3, 4:7, 11:14]

SMOOTHING_SCALE = 0.005
"""Standard deviation (metres) of :class:`SmoothedPolicy`'s offsets in the default expert. Chosen on
5 training goals x 2 episodes of 14 families: at 5 mm the smoothed experts kept the scripted
ones' success in 12 (not basketball-v3 and peg-insert-side-v3) and their largest action change for a 1 mm state
change fell from 1.0-2.0 to 0.13-0.5; at 1 cm six families stalled."""

SMOOTHING_SAMPLES = 16
"""Perturbed copies of the observation that each smoothed action averages."""


def _check_smoothing(scale: float, samples: int) -> None:
    if not scale > 0:
        raise ValueError(f"the smoothing scale must be a positive distance in metres; got {scale}")
    if samples < 2 or samples % 2:
        raise ValueError(f"smoothing samples must be a positive even number (offsets come in opposite pairs); got {samples}")


class SmoothedPolicy:
    """Randomised smoothing of a scripted policy: its mean action over nearby positions.

    Meta-World's scripted policies switch phase where a distance crosses a threshold (e.g. "hover
    until the hand is within 4 cm of the object in xy, then drop"), so their action jumps by up to
    2 for a 1 mm change of state, and a learned imitation averages across the jump and stalls.
    Here the action at observation ``o`` is the mean of the policy's clipped action over
    ``o + offset`` for a fixed set of Gaussian offsets of the hand and object positions
    (:data:`POSITION_COORDINATES`): a switch becomes a ramp a few ``scale`` wide, climbed in
    ``samples`` steps, and with the same offsets at every call (common random numbers) the
    policy is a deterministic function of the state. The offsets come in
    opposite pairs, so where no sample crosses a switch the affine part of the policy (a gain
    times a position error) cancels and the action equals the scripted one (up to clipping).

    Args:
        policy: A Meta-World scripted policy (``get_action(obs [39]) -> [4]``).
        scale: Standard deviation of the offsets, in metres.
        samples: Perturbed copies averaged per action (even: offsets come in pairs).
        seed: Seeds the offsets.
    """

    def __init__(self, policy: Any, scale: float, samples: int = SMOOTHING_SAMPLES, seed: int = 0) -> None:
        _check_smoothing(scale, samples)
        self.policy = policy
        self.scale = scale
        half = np.random.default_rng(seed).standard_normal((samples // 2, len(POSITION_COORDINATES))) * scale
        self.offsets = np.concatenate([half, -half])

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        """The ``[4]`` smoothed action for one ``[39]`` observation (with the goal in it)."""
        # One fresh row per offset: some scripted policies edit the observation they are given.
        batch = np.repeat(np.asarray(obs, dtype=np.float64)[None], len(self.offsets), axis=0)
        batch[:, POSITION_COORDINATES] += self.offsets
        # Clip before averaging: the env clips each action, and an unclipped gain of 25 would let
        # the samples past a switch outweigh the others.
        actions = np.clip(np.stack([self.policy.get_action(row) for row in batch]), -1.0, 1.0)
        return actions.mean(axis=0)


class MetaWorldExpert:
    """Meta-World's scripted policies (``metaworld.policies``), one per task family, made smooth
    enough for a learned head to imitate.

    A family of ``unsmoothed`` gets its scripted policy as is, one of :data:`SMOOTH_POLICIES`
    its hand-written smooth policy, and every other family its scripted policy under
    :class:`SmoothedPolicy`. Which families to leave unsmoothed is measured, not listed:
    :func:`improver.tasks.expert_check.expert_check` compares the smoothed and the raw policy on
    training tasks, and ``improver train`` generates with :meth:`raw` for the families whose
    smoothing costs success (a scripted policy that holds its object 1-2 mm inside a switch, as
    basketball-v3's and peg-insert-side-v3's do, stalls when smoothed).

    Args:
        smoothing: Scale (metres) of :class:`SmoothedPolicy`, or ``None`` for the scripted
            policies as they are.
        samples: Samples per smoothed action.
        seed: Seeds the smoothing offsets.
        hand_written: Use the hand-written policies of :data:`SMOOTH_POLICIES`.
        unsmoothed: Families whose scripted policy is used as it is.
    """

    position_coordinates = POSITION_COORDINATES
    """Observation coordinates that are positions, in metres (what an expert check measures changes of)."""

    def __init__(
        self, smoothing: float | None = SMOOTHING_SCALE, samples: int = SMOOTHING_SAMPLES, seed: int = 0, hand_written: bool = True,
        unsmoothed: Collection[str] = (),
    ) -> None:
        if smoothing is not None:
            _check_smoothing(smoothing, samples)  # fail here, not at the first rollout
        self.smoothing = smoothing
        self.samples = samples
        self.seed = seed
        self.hand_written = hand_written
        self.unsmoothed = frozenset(unsmoothed)

    def raw(self, families: Collection[str] | None = None) -> "MetaWorldExpert":
        """Meta-World's scripted policies exactly as they are (no hand-written ones, no smoothing),
        for ``families`` only if given (the others as this expert has them)."""
        if families is None:
            return MetaWorldExpert(smoothing=None, hand_written=False)
        return MetaWorldExpert(self.smoothing, self.samples, self.seed, self.hand_written, self.unsmoothed | set(families))

    def policy(self, family: str) -> Any:
        """The policy (``get_action(obs [39]) -> [4]``, goal in the observation) used for ``family``."""
        from metaworld.policies import ENV_POLICY_MAP

        if family not in ENV_POLICY_MAP:
            raise ValueError(f"Meta-World has no scripted policy for task family {family!r}")
        scripted = ENV_POLICY_MAP[family]()
        if family in self.unsmoothed:
            return scripted
        if self.hand_written and family in SMOOTH_POLICIES:
            return SMOOTH_POLICIES[family]()
        if self.smoothing is None:
            return scripted
        return SmoothedPolicy(scripted, self.smoothing, self.samples, self.seed)

    def for_task(self, info: TaskInfo) -> "_BoundExpert":
        """Bind to one task: its family's policy and its hidden goal."""
        policy = self.policy(info.family)
        aim = np.asarray(info.parameters, dtype=np.float64) + AIM_OFFSET.get(info.family, 0.0)
        return _BoundExpert(policy, aim)

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        raise TypeError("the Meta-World expert needs its task: call expert.for_task(info) first (rollout does this)")


class _BoundExpert:
    def __init__(self, policy: Any, goal: np.ndarray) -> None:
        self.policy = policy
        self.goal = goal

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        obs = observations.detach().cpu().double().numpy().copy()
        # The learner's observation hides the goal; the scripted policy reads it from there.
        obs[:, GOAL_SLICE] = self.goal
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Constant")  # gains above 1 are clipped by the env
            actions = np.stack([self.policy.get_action(row) for row in obs])
        return torch.as_tensor(actions, dtype=torch.float32)


def _suite(name: str, seed: int, splits: dict[str, list[Any]]) -> Suite:
    metaworld = _metaworld()
    max_steps = metaworld.sawyer_xyz_env.SawyerXYZEnv.max_path_length
    tasks = {
        split: tuple(
            Task(
                suite=name,
                family=mw_task.env_name,
                split=split,
                index=i,
                suite_seed=seed,
                max_steps=max_steps,
                reward_function_version="v2",
                build=partial(_build, mw_task.env_name, mw_task),
            )
            for i, mw_task in enumerate(mw_tasks)
        )
        for split, mw_tasks in splits.items()
    }
    return Suite(
        name=name,
        seed=seed,
        splits=tasks,
        expert=MetaWorldExpert(),
        observation_dim=OBSERVATION_DIM,
        action_dim=ACTION_DIM,
    )


def ml_suite(kind: str, family: str | None, seed: int) -> Suite:
    """Build ``ML1:<family>``, ``ML10`` or ``ML45``: held-out goals (ML1) or held-out families."""
    metaworld = _metaworld()
    if kind == "ML1":
        if family not in metaworld.ML1.ENV_NAMES:
            raise ValueError(f"unknown Meta-World task {family!r}; choose one of {', '.join(metaworld.ML1.ENV_NAMES)}")
        benchmark = metaworld.ML1(family, seed=seed)
        name = f"ML1:{family}"
    else:
        benchmark = getattr(metaworld, kind)(seed=seed)
        name = kind
    return _suite(name, seed, {"train": benchmark.train_tasks, "test": benchmark.test_tasks})


def mt_suite(kind: str, seed: int) -> Suite:
    """Build ``MT10`` or ``MT50``: multi-task suites with the goal observed and no held-out split."""
    benchmark = getattr(_metaworld(), kind)(seed=seed)
    return _suite(kind, seed, {"train": benchmark.train_tasks})
