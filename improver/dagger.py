"""Distil a behaviour policy into the user's own policy class by DAgger.

Parameters mode fits the user's policy to the improved actions on the states the experience
visited, and nowhere else; a fitted policy that drifts off those states meets actions it never
learned (push-v3: the fit matches on the visited states, error 0.0008, and is 1.9 off on its own).
DAgger (Ross et al., 2011) closes that gap: the student acts, the teacher (the improver's behaviour
policy) labels the states the *student* visits, and the student is refitted on all labels so far.

    teacher, rows = improve(improver, policy, task, mode="behaviour", ...)
    student, rounds = dagger(teacher, policy, task, rounds=3, states=experience.observations[experience.mask])
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Sequence

import gymnasium as gym
import torch
from torch import nn
from tqdm.auto import tqdm

from .augment.noise import ExplorationNoise
from .distill import fit_policy
from .loop import as_tasks
from .policies import placement
from .tasks import Task, rollout
from .tasks.evaluation import spread


def labelled(teacher: nn.Module, states: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The teacher's actions ``[N, act_dim]`` on ``states`` ``[N, obs_dim]``, in chunks, without gradients."""
    with torch.no_grad():
        return torch.cat([teacher(states[i : i + chunk]).float().cpu() for i in range(0, len(states), chunk)])


def dagger(
    teacher: nn.Module,
    student: nn.Module,
    tasks: Task | Sequence[Task] | Callable[[], gym.Env],
    rounds: int = 3,
    episodes: int = 10,
    *,
    states: torch.Tensor | None = None,
    exploration: float = 0.1,
    epochs: int = 30,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Fit a copy of ``student`` to ``teacher`` on the states the student itself visits.

    If ``states`` are given the copy is first fitted to the teacher's actions on them. Each round
    then collects ``episodes`` episodes with the copy (plus Gaussian ``exploration`` noise, seeded
    per round), labels their states with the teacher, and refits the copy (Adam, ``epochs`` passes)
    on every label so far.

    Args:
        teacher: The policy to imitate, e.g. a :class:`~improver.operator.BehaviourPolicy` from the
            improvement loop in behaviour mode; maps ``[B, obs_dim]`` to ``[B, act_dim]``.
        student: Any ``nn.Module`` with the same inputs and outputs; never modified.
        tasks: A task, several (episodes go round-robin), or a Gymnasium env factory.
        rounds: DAgger rounds, each ``episodes`` episodes.
        episodes: Episodes per round.
        states: ``[N, obs_dim]`` states to label before the first round (the loop's experience).
        exploration: Standard deviation of the action noise while the student collects.
        epochs: Adam epochs of each fit.
        seed: Seed of the collected episodes (round ``r`` uses ``seed + r``) and of the fits.
        progress: Show a progress bar over rounds.

    Returns:
        The fitted copy and one row per round: ``round``, ``success`` and ``mean_return`` of the
        episodes it collected (before that round's refit), ``env_steps`` collected so far,
        ``labels`` (states fitted on after the round) and ``wall_s``.
    """
    if rounds < 1 or episodes < 1:
        raise ValueError(f"rounds and episodes must be at least 1; got {rounds} and {episodes}")
    if not exploration >= 0.0:
        raise ValueError(f"exploration must be a non-negative noise level; got {exploration}")
    if states is not None and (states.ndim != 2 or len(states) == 0):
        raise ValueError(f"states must be a non-empty [N, obs_dim] tensor; got shape {tuple(states.shape)}")
    tasks = spread(as_tasks(tasks), episodes)
    student = copy.deepcopy(student)
    device, dtype = placement(student)
    generator = torch.Generator().manual_seed(seed)
    observed = [] if states is None else [states.float().cpu()]
    actions = [labelled(teacher, s) for s in observed]

    def refit() -> None:
        with torch.enable_grad():
            fit_policy(student, torch.cat(observed).to(device, dtype), torch.cat(actions).to(device, dtype), epochs=epochs, generator=generator)

    start, env_steps, rows = time.perf_counter(), 0, []
    if observed:
        refit()
    for r in tqdm(range(rounds), desc="dagger", unit="round", disable=not progress):
        actor = ExplorationNoise(exploration, seed + r).wrap(student)
        experience = rollout(actor, tasks, 1, seed=seed + r, progress=False)
        env_steps += int(experience.lengths.sum())
        visited = experience.observations[experience.mask].float()
        observed.append(visited)
        actions.append(labelled(teacher, visited))
        refit()
        rows.append(
            {
                "round": r + 1,
                "success": float(experience.success.float().mean()),
                "mean_return": float(experience.returns.mean()),
                "env_steps": env_steps,
                "labels": sum(len(s) for s in observed),
                "wall_s": time.perf_counter() - start,
            }
        )
    return student.eval(), rows
