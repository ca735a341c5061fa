"""``toy:reach2d``: a tiny pure-Python goal-reaching suite so that tests run without MuJoCo.

A point moves in the plane toward a goal it cannot see. Like Meta-World's ML1, train and
held-out tasks are goals drawn with different seeds, and success is "within reach of the goal".
"""

from __future__ import annotations

from functools import partial

import gymnasium as gym
import numpy as np
import torch

from improver.types import TaskInfo

from .rendering import RenderConfig
from .suite import Suite, Task

MAX_STEPS = 40
SPEED = 0.1
SUCCESS_RADIUS = 0.05
NUM_TASKS = {"train": 50, "test": 10}


class Reach2D(gym.Env):
    """Point-mass reaching. Observation: position and last velocity ``[x, y, vx, vy]``; goal hidden.

    Actions in ``[-1, 1]^2`` set the velocity (times ``SPEED``); reward is minus the distance
    to the goal; ``info["success"]`` is 1.0 within ``SUCCESS_RADIUS``.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, goal: np.ndarray, render: RenderConfig | None = None) -> None:
        self.goal = np.asarray(goal, dtype=np.float32)
        self.render_config = render
        self.render_mode = "rgb_array" if render else None
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.position = np.zeros(2, dtype=np.float32)
        self.velocity = np.zeros(2, dtype=np.float32)

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.position, self.velocity]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position = self.np_random.uniform(-0.2, 0.2, size=2).astype(np.float32)
        self.velocity = np.zeros(2, dtype=np.float32)
        return self._obs(), {"task_parameters": self.goal.copy()}

    def step(self, action: np.ndarray):
        self.velocity = SPEED * np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        self.position = np.clip(self.position + self.velocity, -1.0, 1.0)
        distance = float(np.linalg.norm(self.position - self.goal))
        return self._obs(), -distance, False, False, {"success": float(distance < SUCCESS_RADIUS)}

    def render(self) -> np.ndarray:
        """Draw the goal (green) and the point (red) on a white ``[H, W, 3]`` uint8 canvas."""
        size = self.render_config.size if self.render_config else 64
        canvas = np.full((size, size, 3), 255, dtype=np.uint8)
        yy, xx = np.mgrid[0:size, 0:size]
        for centre, colour in ((self.goal, (40, 170, 60)), (self.position, (210, 40, 40))):
            px = (centre + 1.0) / 2.0 * (size - 1)
            disc = (xx - px[0]) ** 2 + (yy - (size - 1 - px[1])) ** 2 <= max(1.0, size / 20) ** 2
            canvas[disc] = colour
        return canvas


class Reach2DExpert:
    """Scripted expert: heads straight for the goal that its task record reveals."""

    def for_task(self, info: TaskInfo) -> "_GoalSeeker":
        """Bind to one task's (hidden) goal."""
        return _GoalSeeker(torch.tensor(info.parameters, dtype=torch.float32))

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        raise TypeError("the reach2d expert needs its task: call expert.for_task(info) first (rollout does this)")


class _GoalSeeker:
    def __init__(self, goal: torch.Tensor) -> None:
        self.goal = goal

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        return ((self.goal.to(observations) - observations[:, :2]) / SPEED).clamp(-1.0, 1.0)


def _build(goal: tuple[float, float], render: RenderConfig | None) -> Reach2D:
    return Reach2D(np.array(goal), render)


def _goals(seed: int, count: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0.0, 2 * np.pi, size=count)
    radius = rng.uniform(0.5, 0.9, size=count)
    return [(float(r * np.cos(a)), float(r * np.sin(a))) for a, r in zip(angle, radius)]


def reach2d_suite(seed: int = 0) -> Suite:
    """Build ``toy:reach2d``: 50 train goals drawn with ``seed``, 10 held-out goals with ``seed + 1``."""
    splits = {
        split: tuple(
            Task(
                suite="toy:reach2d",
                family="reach2d",
                split=split,
                index=i,
                suite_seed=seed,
                max_steps=MAX_STEPS,
                reward_function_version="toy",
                build=partial(_build, goal),
            )
            for i, goal in enumerate(_goals(seed + offset, NUM_TASKS[split]))
        )
        for offset, split in enumerate(("train", "test"))
    }
    return Suite(name="toy:reach2d", seed=seed, splits=splits, expert=Reach2DExpert(), observation_dim=4, action_dim=2)
