"""D-REX noise ladders: roll a policy out with more and more noise and rank episodes by it.

D-REX (Brown et al., CoRL 2019) assumes more injected noise means worse behaviour. Rather than
trust it, :func:`check_noise_ranking` measures it per task on the collected episodes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from scipy.stats import spearmanr

from improver.tasks import RenderConfig, Task, rollout
from improver.types import Policy, Trajectory

from .noise import NOISES, NoisyPolicy, derive_seed, make_noise

DREX_LEVELS = (1.0, 0.75, 0.5, 0.25, 0.02)


@dataclass(frozen=True)
class NoiseLadder:
    """Noise levels from worst to best, and the kind of noise (``epsilon``, ``gaussian``, ``ou``)."""

    levels: tuple[float, ...] = DREX_LEVELS
    kind: str = "epsilon"

    def __post_init__(self) -> None:
        if self.kind not in NOISES:
            raise ValueError(f"unknown noise {self.kind!r}; choose one of {sorted(NOISES)}")
        if len(self.levels) < 2:
            raise ValueError(f"a noise ladder needs at least two levels; got {self.levels}")
        for level in self.levels:
            make_noise(self.kind, level)  # validates the level

    @classmethod
    def evenly(cls, count: int, high: float = 1.0, low: float = 0.02, kind: str = "epsilon") -> NoiseLadder:
        """``count`` levels spaced evenly from ``high`` down to ``low``."""
        if count < 2:
            raise ValueError(f"a noise ladder needs at least two levels; got {count}")
        return cls(tuple(high + (low - high) * i / (count - 1) for i in range(count)), kind)


@dataclass(frozen=True)
class RankedFamily:
    """Episodes tagged with the noise level they were collected at.

    Attributes:
        trajectory: All episodes, level by level, task by task within a level.
        levels: ``[B]`` float noise level of each episode (higher is assumed worse).
    """

    trajectory: Trajectory
    levels: torch.Tensor

    @property
    def ranks(self) -> torch.Tensor:
        """``[B]`` rank score, larger is better: minus the noise level."""
        return -self.levels


def ranked_family(
    policy: Policy,
    tasks: Task | Sequence[Task],
    ladder: NoiseLadder = NoiseLadder(),
    episodes_per_level: int = 2,
    seed: int = 0,
    render: RenderConfig | None = None,
    max_steps: int | None = None,
) -> RankedFamily:
    """Roll ``policy`` out under every level of ``ladder``, ``episodes_per_level`` episodes per task."""
    parts, levels = [], []
    for j, level in enumerate(ladder.levels):
        noisy = NoisyPolicy(policy, make_noise(ladder.kind, level), seed=derive_seed(seed, j))
        part = rollout(noisy, tasks, episodes_per_level, seed=derive_seed(seed, j, 1), render=render, max_steps=max_steps, progress=False)
        parts.append(part)
        levels.append(torch.full((part.num_episodes,), float(level)))
    return RankedFamily(Trajectory.cat(parts), torch.cat(levels))


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    if torch.unique(y).numel() < 2:
        return None  # undefined for a constant outcome
    value = float(spearmanr(x.numpy(), y.numpy()).statistic)
    return None if math.isnan(value) else value


def check_noise_ranking(family: RankedFamily, warn: bool = True) -> list[dict[str, Any]]:
    """Per task: Spearman correlation of noise level with true return and with success.

    D-REX's assumption holds on a task when the return correlation is negative. Tasks where it
    is not are flagged (``holds: False``) and, with ``warn``, reported through ``warnings``.
    """
    traj = family.trajectory
    keys = list(dict.fromkeys((info.family, info.split, info.index) for info in traj.tasks))
    returns, success = traj.returns, traj.success.float()
    rows = []
    for key in keys:
        idx = [i for i, info in enumerate(traj.tasks) if (info.family, info.split, info.index) == key]
        rho_return = _spearman(family.levels[idx], returns[idx])
        rows.append(
            {
                "family": key[0],
                "split": key[1],
                "index": key[2],
                "episodes": len(idx),
                "rho_return": rho_return,
                "rho_success": _spearman(family.levels[idx], success[idx]),
                "holds": rho_return is not None and rho_return < 0,
            }
        )
    failed = [f"{r['family']}[{r['split']} {r['index']}]" for r in rows if not r["holds"]]
    if warn and failed:
        warnings.warn(f"D-REX assumption (more noise, lower return) fails on {len(failed)} task(s): {', '.join(failed)}", stacklevel=2)
    return rows
