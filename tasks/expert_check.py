"""Can a smooth learned head imitate a suite's scripted expert? Its success and how much its action jumps.

A head that imitates an expert (a Gaussian mixture on a smooth network) cannot follow an action
that jumps for a tiny change of state: it averages across the jump and can stall there (Meta-World's
scripted push policy, imitated, hovered above the puck for ever). :func:`expert_check` measures,
on a few tasks, the expert's success and its "jumpiness": the largest change of its action
between two points of its own path whose positions differ by at most ``delta`` (1 mm). It does
so for the expert the suite uses and, where the expert has one (``expert.raw()``), for the
unsmoothed scripted policy it was made from, and says when the expert looks hard to imitate.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from improver.types import Policy, Trajectory

from .evaluation import format_table
from .rollout import rollout
from .suite import Suite, Task

JUMP_LIMIT = 0.75
"""Largest action change (each action coordinate spans 2) for a 1 mm state change that a smooth
head is taken to follow. Measured on 14 Meta-World families: the scripted policies jump by 1.0-2.0
at their phase switches, their smoothed versions (16 samples, 5 mm) by 0.13-0.5."""

SUCCESS_LIMIT = 0.8
"""Lowest success rate for an expert whose imitation is worth training."""

RAW_MARGIN = 0.2
"""Success the suite's (smoothed) expert may lose against its raw scripted policy before the raw
one is imitated instead (:attr:`ExpertCheck.use_raw`): 2 of the 10 episodes of a default check."""


class ExpertStats(NamedTuple):
    """What one expert did on the checked tasks of one family.

    Attributes:
        success: Fraction of episodes that succeeded (at any step).
        jump_max: Largest change of the (clipped) action, in any coordinate, between two points
            of the expert's path whose positions differ by at most ``delta``
            (see :func:`action_jumps`).
        jump_p95: 95th percentile over steps of the largest such change within one step.
        steps: Steps the jumps were measured on (each episode up to its first success).
    """

    success: float
    jump_max: float
    jump_p95: float
    steps: int


class ExpertCheck(NamedTuple):
    """The check of one task family.

    Attributes:
        family: Task family.
        expert: The suite's expert, as rollouts and datasets use it.
        raw: The scripted policy it was made from (``suite.expert.raw()``), or ``None`` when the
            expert has no ``raw``.
        problem: Why a smooth head may fail to imitate the expert, or ``None`` when nothing was found.
    """

    family: str
    expert: ExpertStats
    raw: ExpertStats | None
    problem: str | None

    @property
    def use_raw(self) -> bool:
        """Whether the raw scripted policy is the better one to imitate (:func:`raw_is_better`)."""
        return raw_is_better(self.expert.success, None if self.raw is None else self.raw.success)


def raw_is_better(expert_success: float, raw_success: float | None) -> bool:
    """Whether an expert's smoothing costs more than :data:`RAW_MARGIN` of its raw form's success
    (a jumpy expert that works beats a smooth one that stalls); ``raw_success`` ``None``: no raw form."""
    return raw_success is not None and raw_success - expert_success > RAW_MARGIN


def _action_bounds(task: Task) -> tuple[np.ndarray, np.ndarray]:
    env = task.make_env()
    try:
        return env.action_space.low, env.action_space.high
    finally:
        env.close()


def action_jumps(
    expert: Policy, trajectory: Trajectory, coordinates: Sequence[int], delta: float, bounds: tuple[np.ndarray, np.ndarray]
) -> list[np.ndarray]:
    """Per episode, the largest action change along each step's path for a state change of ``delta``.

    Each step's segment of the episode (from one state to the next) is cut into pieces that move
    no coordinate of ``coordinates`` by more than ``delta``, and the expert acts at every cut: a
    phase switch the expert passes through shows as one large change between two neighbouring
    cuts. (Nudging the visited states instead misses most switches: a state seldom lies within
    ``delta`` of a threshold the episode steps over.)

    Args:
        expert: The policy (with ``for_task`` if it needs its task) whose actions are compared.
        trajectory: Episodes whose paths (``mask``-ed steps) are followed.
        coordinates: Observation coordinates whose change is measured (positions, in metres for Meta-World).
        delta: Largest change of a coordinate between neighbouring cuts.
        bounds: The action space's ``low`` and ``high`` ``[act_dim]``; actions are clipped to them
            as the environment does.

    Returns:
        One ``[T_i - 1]`` array per episode of ``T_i`` steps: per step, the largest absolute change
        of any action coordinate between neighbouring cuts of its segment.
    """
    low, high = (torch.as_tensor(b, dtype=torch.float32) for b in bounds)
    jumps = []
    for i, info in enumerate(trajectory.tasks):
        states = trajectory.observations[i, trajectory.mask[i]].double()  # [T, obs_dim]
        step = states[1:] - states[:-1]
        pieces = (step[:, coordinates].abs().amax(dim=1) / delta).ceil().clamp(min=1).long()  # [T - 1]
        segment = torch.repeat_interleave(torch.arange(len(step)), pieces)
        # Cut j of a segment of n pieces lies j / n of the way from its state to the next; the
        # episode's last state closes the path, so the change from a cut to the next is its segment's.
        fraction = torch.cat([torch.arange(n, dtype=torch.float64) / n for n in pieces.tolist()])
        cuts = torch.cat([states[segment] + fraction[:, None] * step[segment], states[-1:]])
        bound = expert.for_task(info) if hasattr(expert, "for_task") else expert
        with torch.no_grad():
            actions = bound(cuts.float()).clamp(low, high)
        change = (actions[1:] - actions[:-1]).abs().amax(dim=1)
        jumps.append(torch.zeros(len(step)).scatter_reduce(0, segment, change, reduce="amax").numpy())
    return jumps


def measure_expert(
    expert: Policy,
    tasks: Sequence[Task],
    episodes: int,
    *,
    coordinates: Sequence[int],
    delta: float = 1e-3,
    seed: int = 0,
    max_steps: int | None = None,
    progress: bool = False,
) -> dict[str, ExpertStats]:
    """Success and jumpiness of ``expert`` per task family, over ``episodes`` episodes of each task.

    Episodes stop at their first success: what follows does not decide whether an imitation succeeds.

    Args:
        expert: The policy to measure (with ``for_task`` if it needs its task).
        tasks: Tasks to run it on.
        episodes: Episodes per task.
        coordinates: Observation coordinates whose change ``delta`` bounds (positions, in metres for Meta-World).
        delta: Largest change of a coordinate over which the action change is measured.
        seed: Seeds the episodes' resets.
        max_steps: Cap on episode length (default: the task's own).
        progress: Show a progress bar.

    Returns:
        ``{family: ExpertStats}`` in order of first appearance in ``tasks``.
    """
    if delta <= 0:
        raise ValueError(f"delta must be a positive state change; got {delta}")
    if not tasks:
        raise ValueError("measure_expert needs at least one task")
    traj = rollout(expert, tasks, episodes, seed=seed, max_steps=max_steps, stop_on_success=True, progress=progress)
    jumps = action_jumps(expert, traj, coordinates, delta, _action_bounds(tasks[0]))
    stats = {}
    for family in dict.fromkeys(info.family for info in traj.tasks):
        idx = [i for i, info in enumerate(traj.tasks) if info.family == family]
        per_step = np.concatenate([jumps[i] for i in idx])
        moved = per_step.size > 0  # not when every episode succeeded at its first step
        stats[family] = ExpertStats(
            success=float(traj.success[idx].float().mean()),
            jump_max=float(per_step.max()) if moved else 0.0,
            jump_p95=float(np.percentile(per_step, 95)) if moved else 0.0,
            steps=len(per_step),
        )
    return stats


def _problem(stats: ExpertStats, raw: ExpertStats | None) -> str | None:
    if stats.success < SUCCESS_LIMIT:
        reference = f" (the unsmoothed scripted policy: {raw.success:.0%})" if raw is not None else ""
        return f"the expert succeeds in only {stats.success:.0%} of episodes{reference}; its imitation will do no better"
    if stats.jump_max > JUMP_LIMIT:
        return (
            f"the expert's action jumps by up to {stats.jump_max:.2f} for a small state change; a smooth head "
            "averages across such jumps and can stall there (smooth the expert, or refine the head on its own states)"
        )
    return None


def expert_check(
    suite: Suite,
    split: str = "train",
    tasks: int = 5,
    episodes: int = 2,
    *,
    delta: float = 1e-3,
    seed: int = 0,
    max_steps: int | None = None,
    progress: bool = False,
) -> dict[str, ExpertCheck]:
    """Check, per task family, that a smooth head can imitate ``suite.expert``.

    Runs the expert (and, when it has ``raw()``, the scripted policy it was made from) on the
    first ``tasks`` tasks of each family of ``split``, and measures its success and its largest
    action change along its own path over a change of at most ``delta`` in every position
    coordinate (the expert's ``position_coordinates``, or every observation coordinate if it
    declares none).

    Args:
        suite: The suite whose expert is checked.
        split: Split whose tasks are used (check on training tasks: held-out ones stay unseen).
        tasks: Tasks per family.
        episodes: Episodes per task.
        delta: State change over which action changes are measured (metres for Meta-World).
        seed: Seeds the episodes' resets (the same for the expert and its raw policy).
        max_steps: Cap on episode length (default: the task's own).
        progress: Show progress bars.

    Returns:
        ``{family: ExpertCheck}``; an entry's ``problem`` says what was found wrong, if anything.
    """
    if tasks <= 0 or episodes <= 0:
        raise ValueError(f"tasks and episodes must be positive; got {tasks} and {episodes}")
    chosen = suite.first(split, tasks * len(suite.families[split]))
    coordinates = list(getattr(suite.expert, "position_coordinates", range(suite.observation_dim)))
    measure = dict(episodes=episodes, coordinates=coordinates, delta=delta, seed=seed, max_steps=max_steps, progress=progress)
    used = measure_expert(suite.expert, chosen, **measure)
    raw = measure_expert(suite.expert.raw(), chosen, **measure) if hasattr(suite.expert, "raw") else {}
    return {
        family: ExpertCheck(family, stats, raw.get(family), _problem(stats, raw.get(family))) for family, stats in used.items()
    }


def format_expert_check(checks: dict[str, ExpertCheck]) -> str:
    """The checks as a Markdown table (raw columns blank where there is no raw policy), then their problems."""
    rows = []
    for check in checks.values():
        raw = check.raw
        rows.append(
            {
                "family": check.family,
                "success": check.expert.success,
                "jump_max": check.expert.jump_max,
                "jump_p95": check.expert.jump_p95,
                "raw_success": "" if raw is None else f"{raw.success:.3f}",
                "raw_jump_max": "" if raw is None else f"{raw.jump_max:.3f}",
                "raw_jump_p95": "" if raw is None else f"{raw.jump_p95:.3f}",
            }
        )
    problems = [f"{c.family}: {c.problem}" for c in checks.values() if c.problem]
    return "\n".join([format_table(rows), *problems])
