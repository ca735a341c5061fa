"""A task family of your own: Gymnasium's MuJoCo ``Reacher-v5`` with a hidden goal per task.

Importing this module registers the suite ``reacher`` (50 training goals, 10 held-out goals).
For the command line, name the file in ``IMPROVER_PLUGINS``:

    IMPROVER_PLUGINS=examples/reacher_suite.py improver generate --suite reacher --out data/reacher

What a suite needs (the rollout contract of ``improver.tasks.Task``): ``reset(seed=...)`` is
honoured, the reset ``info`` carries ``"task_parameters"`` (the goal), each step's ``info`` carries ``"success"``; and
for dataset generation a scripted expert with ``for_task(info)`` (``info.parameters`` is the goal).
"""

from __future__ import annotations

from functools import partial

import gymnasium as gym
import numpy as np
import torch

from improver.tasks import RenderConfig, Suite, Task
from improver.tasks.registry import register_suite
from improver.types import TaskInfo

NAME = "reacher"
MAX_STEPS = 50  # Reacher-v5's own limit: one second of simulated time
SUCCESS_RADIUS = 0.02  # fingertip within 2 cm of the target ...
SUCCESS_SPEED = 1.0  # ... and joints slower than 1 rad/s: an arm swinging through the target does not count
NUM_TASKS = {"train": 50, "test": 10}
LINKS = (0.1, 0.11)  # arm and forearm lengths in reacher.xml


class HiddenGoalReacher(gym.Wrapper):
    """``Reacher-v5`` with the target placed at the task's goal and removed from the observation.

    Observation ``[8]``: ``cos q, sin q`` of both joints, their velocities, and the fingertip's
    ``x, y`` (Reacher's own observation shows the target; here the learner must infer it from
    rewards, as in Meta-World's ML1). Reward: minus the fingertip's distance to the target.
    Success: within ``SUCCESS_RADIUS`` of it and slower than ``SUCCESS_SPEED``.
    """

    def __init__(self, goal: tuple[float, float], render: RenderConfig | None = None) -> None:
        kwargs = {"render_mode": "rgb_array", "width": render.size, "height": render.size} if render else {}
        # Without the control cost the reward says only how far the target is, which is what the
        # improver reads the hidden goal from.
        super().__init__(gym.make("Reacher-v5", max_episode_steps=MAX_STEPS, reward_control_weight=0.0, **kwargs))
        self.goal = np.asarray(goal, dtype=np.float64)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(8,), dtype=np.float32)

    def _obs(self) -> np.ndarray:
        data = self.env.unwrapped.data
        q, qvel = data.qpos.flat[:2], data.qvel.flat[:2]
        tip = self.env.unwrapped.get_body_com("fingertip")[:2]
        return np.concatenate([np.cos(q), np.sin(q), qvel, tip]).astype(np.float32)

    def _success(self) -> float:
        arm = self.env.unwrapped
        distance = np.linalg.norm(arm.get_body_com("fingertip")[:2] - self.goal)
        return float(distance < SUCCESS_RADIUS and np.linalg.norm(arm.data.qvel.flat[:2]) < SUCCESS_SPEED)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.env.reset(seed=seed, options=options)
        arm = self.env.unwrapped
        qpos, qvel = arm.data.qpos.copy(), arm.data.qvel.copy()
        qpos[-2:], qvel[-2:] = self.goal, 0.0  # the target is two slide joints
        arm.set_state(qpos, qvel)
        return self._obs(), {"task_parameters": self.goal.astype(np.float32)}

    def step(self, action: np.ndarray):
        _, reward, terminated, truncated, info = self.env.step(action)
        return self._obs(), reward, terminated, truncated, {**info, "success": self._success()}


class ReacherExpert:
    """Scripted expert: a PD controller toward the joint angles that put the fingertip on the goal."""

    def for_task(self, info: TaskInfo) -> "_InverseKinematics":
        """Bind to one task's (hidden) goal."""
        return _InverseKinematics(np.asarray(info.parameters, dtype=np.float64))

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        raise TypeError("the reacher expert needs its task: call expert.for_task(info) first (rollout does this)")


class _InverseKinematics:
    def __init__(self, goal: np.ndarray) -> None:
        (l1, l2), (x, y) = LINKS, goal
        elbow = np.arccos(np.clip((x * x + y * y - l1 * l1 - l2 * l2) / (2 * l1 * l2), -1.0, 1.0))
        shoulder = np.arctan2(y, x) - np.arctan2(l2 * np.sin(elbow), l1 + l2 * np.cos(elbow))
        self.target = torch.tensor([shoulder, elbow], dtype=torch.float32)

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        angle = torch.atan2(observations[:, 2:4], observations[:, 0:2])
        error = torch.remainder(self.target.to(observations) - angle + torch.pi, 2 * torch.pi) - torch.pi
        return (2.0 * error - 0.15 * observations[:, 4:6]).clamp(-1.0, 1.0)


def _goals(seed: int, count: int) -> list[tuple[float, float]]:
    # Reacher-v5 draws targets within 0.2 of the base; keep them reachable (arm length 0.21)
    rng = np.random.default_rng(seed)
    angle, radius = rng.uniform(0.0, 2 * np.pi, count), rng.uniform(0.05, 0.19, count)
    return [(float(r * np.cos(a)), float(r * np.sin(a))) for a, r in zip(angle, radius)]


@register_suite(NAME)
def reacher_suite(seed: int = 0) -> Suite:
    """``reacher``: 50 train goals drawn with ``seed``, 10 held-out goals with ``seed + 1``."""
    splits = {
        split: tuple(
            Task(NAME, "reacher", split, i, seed, MAX_STEPS, "reacher-v5", build=partial(HiddenGoalReacher, goal))
            for i, goal in enumerate(_goals(seed + offset, NUM_TASKS[split]))
        )
        for offset, split in enumerate(("train", "test"))
    }
    return Suite(NAME, seed, splits, expert=ReacherExpert(), observation_dim=8, action_dim=2)
