"""The improvement loop, used like an RL loop: collect episodes with the policy, ``step``, repeat.

:func:`improvement_loop` is the generator (one :class:`LoopStep` per step, callbacks, progress
bar); :func:`improve` runs it to the end and returns the final policy and the per-step rows.

    for state in improvement_loop(improver, policy, task, steps=5, callbacks=[StopOnSuccess(0.9)]):
        print(state.metrics)           # step, success, mean_return, env_steps, wall_s
    policy = state.policy
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import gymnasium as gym
import torch
from torch import nn
from tqdm.auto import tqdm

from .augment.noise import ExplorationNoise, derive_seed
from .io import FolderKind, atomic_path
from .loop_settings import LoopSettings, Mode
from .operator import BehaviourPolicy, Improver
from .policies import POLICY_CLASSES, save_policy
from .saved_files import write_weights
from .tasks import RenderConfig, Task, rollout
from .tasks.evaluation import spread
from .types import TaskInfo, Trajectory


@dataclass(frozen=True)
class LoopStep:
    """What one step of :func:`improvement_loop` saw.

    Attributes:
        step: Step number; 0 is the starting policy.
        policy: The policy of this step (step ``k`` is the starting policy improved ``k`` times).
        experience: Its episodes, ``episodes`` of them (observations ``[B, T, obs_dim]``, ...).
        metrics: ``step``, ``success`` (fraction of the policy's own episodes that succeeded; in
            parameters mode half the experience is the teacher's), ``mean_return`` (of those),
            ``env_steps`` (all steps collected so far, this step's included) and ``wall_s`` (time
            spent in the loop so far, not in the caller's code).
    """

    step: int
    policy: nn.Module
    experience: Trajectory
    metrics: dict[str, Any]


class Callback(Protocol):
    """Called with every :class:`LoopStep` before it is yielded; returning ``False`` stops the loop.

    The rule is stable-baselines3's (a callback's ``_on_step`` returns ``False`` to stop training),
    so one callback can serve both; ``None`` (no return value) and ``True`` continue."""

    def __call__(self, state: LoopStep) -> bool | None: ...


def as_tasks(tasks: Task | Sequence[Task] | Callable[[], gym.Env]) -> list[Task]:
    """A task, tasks, or a Gymnasium env factory (wrapped by :func:`improver.integrations.envs.env_task`) as a task list."""
    if isinstance(tasks, Task):
        return [tasks]
    if callable(tasks):
        from .integrations.envs import env_task

        return [env_task(tasks)]
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, Task) for t in tasks):
        raise TypeError("tasks must be a Task, a non-empty sequence of Tasks, or a function returning a gymnasium.Env")
    return tasks


def improvement_loop(
    improver: Improver,
    policy: nn.Module,
    tasks: Task | Sequence[Task] | Callable[[], gym.Env],
    steps: int = 3,
    episodes: int = 10,
    *,
    seed: int = 0,
    mode: Mode | None = None,
    reward_free: bool = False,
    memory: int | None = None,
    exploration: float | None = None,
    task_exploration: float | None = None,
    wide_task_exploration: float | None = None,
    render: RenderConfig | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
) -> Iterator[LoopStep]:
    """Collect ``episodes`` episodes (spread over ``tasks``), ``step``, repeat ``steps`` times.

    Yields ``steps + 1`` states (step 0 is the starting policy) unless a callback stops it early.
    The improvement of step ``k + 1`` runs when the caller asks for the next state.

    ``mode``, ``memory``, ``exploration``, ``task_exploration`` and ``wide_task_exploration``
    left ``None`` take the improver's :attr:`~improver.operator.Improver.loop_settings`
    (see :meth:`LoopSettings.overridden`: parameters mode drops the carried task exploration).

    Args:
        improver: A trained improver.
        policy: Any ``nn.Module`` mapping ``[B, obs_dim]`` to ``[B, act_dim]``; never modified.
        tasks: A task, several (episodes go round-robin over them), or a function returning a
            Gymnasium env (success read from ``info["is_success"]``; see ``env_task``).
        steps: Improvement steps.
        episodes: Episodes collected per step.
        seed: Seed of the episodes (step ``k`` uses ``seed + k``).
        mode: ``"parameters"`` (a distilled copy of ``policy``) or ``"behaviour"``; default: the improver's.
            In parameters mode each step fits the copy on the states of every step so far, each
            labelled with the behaviour improved from the latest experience, and from step 1 on
            half of each step's episodes (rounded down) are acted by that behaviour, with the
            task exploration the improver carries for behaviour mode (DAgger within the loop: the
            copy is taught where the behaviour goes and where the previous copies drifted; every
            env step is counted, and ``success`` and ``mean_return`` are the copy's own episodes').
            The copy's own episodes run in up to :data:`DAGGER_ROUNDS` rounds, the copy refitted to
            that behaviour after each; the step's ``policy`` is the copy before them, and the next
            step's copy starts from the refitted one.
        reward_free: Hide the rewards from the improver (its ranking reward model supplies them).
        memory: Each step watches the episodes of the last ``memory`` steps (1: only the current
            policy's, like an RL update; more: earlier policies' too, which spread the states
            the task is inferred from).
        exploration: Standard deviation of Gaussian noise added to the policy's actions (then
            clipped to ``[-1, 1]``) while collecting, seeded per episode. The noisy episodes are
            what the next step watches and what success is measured on: they spread the visited
            states around where the policy heads, so the next step infers the task better
            (reach-v3: success 0.56 after 3 steps without, 1.0 with 0.3).
        task_exploration: Behaviour mode only: each episode of steps 1 and on acts as if the
            inferred task were moved by Gaussian noise of this standard deviation (in the task
            parameters' own units, e.g. metres), seeded per episode (:class:`TaskSampling`). One
            belief pushes every episode's object along one line, and distances to points on a line
            cannot tell a target from its mirror image across it; several spread the object around it.
        wide_task_exploration: Behaviour mode only: task exploration of a step whose previous step's
            episodes all failed (0: ``task_exploration`` always). Near the right belief small noise
            refines it, but a task far from the first estimate is never reached by it (push-v3, a
            refined improver, 0.04 and 0.08: an edge target succeeded on 2 of 3 seeds, never with 0.04 alone).
        render: Frames to render while collecting; an improver that watches frames gets the
            default ``RenderConfig()`` (what ``improver generate --frames`` records) if not given.
        callbacks: Called with each state; one returning ``False`` stops the loop after it (:class:`Callback`).
        progress: Show a progress bar over steps with the latest success and return.
    """
    tasks = spread(as_tasks(tasks), episodes)
    if steps < 0:
        raise ValueError(f"steps must be at least 0; got {steps}")
    # checked here, not in the generator: its body would only raise at the first next()
    settings = settings_for(improver, mode, exploration, task_exploration, wide_task_exploration, memory)
    if render is None and improver.config.use_frames:
        render = RenderConfig()
    return _run(improver, policy, tasks, steps, seed, settings, reward_free, render, callbacks, progress)


def settings_for(
    improver: Improver,
    mode: Mode | None = None,
    exploration: float | None = None,
    task_exploration: float | None = None,
    wide_task_exploration: float | None = None,
    memory: int | None = None,
) -> LoopSettings:
    """``improver``'s loop settings with every argument that is not ``None`` in its place, checked.

    Raises:
        ValueError: a setting is invalid, or task exploration is asked of an improver that infers no task.
    """
    settings = improver.loop_settings.overridden(mode, exploration, task_exploration, wide_task_exploration, memory)
    if (settings.task_exploration or settings.wide_task_exploration) and not improver.config.task_dim:
        raise ValueError("task_exploration needs mode='behaviour' and an improver that infers the task (task_dim > 0)")
    return settings


def _run(
    improver: Improver,
    policy: nn.Module,
    tasks: list[Task],
    steps: int,
    seed: int,
    settings: LoopSettings,
    reward_free: bool,
    render: RenderConfig | None,
    callbacks: Sequence[Callback],
    progress: bool,
) -> Iterator[LoopStep]:
    mode, memory, exploration = settings.mode, settings.memory, settings.exploration
    env_steps, busy, history = 0, 0.0, []
    visited: list[torch.Tensor] = []  # parameters mode: every step's states, fitted on again at every later step (DAgger)
    teacher = None  # parameters mode: the behaviour the current copy was distilled from
    failed = True  # whether the previous step's episodes all failed
    with tqdm(total=steps + 1, desc=f"improve ({mode})", unit="step", disable=not progress) as bar:
        for k in range(steps + 1):
            start = time.perf_counter()
            sigma = settings.task_sigma(failed)
            actor = TaskSampling(policy, sigma, seed=seed + k) if sigma and isinstance(policy, BehaviourPolicy) else policy
            experience, own, student = collect_step(improver, actor, teacher, tasks, exploration, seed + k, visited, failed, render)
            env_steps += int(experience.lengths.sum())
            failed = not bool(experience.success.any())
            busy += time.perf_counter() - start
            metrics = {
                "step": k,
                "success": float(own.success.float().mean()),
                "mean_return": float(own.returns.mean()),
                "env_steps": env_steps,
                "wall_s": busy,
            }
            state = LoopStep(k, policy, experience, metrics)
            stop = any([callback(state) is False for callback in callbacks])  # a list: every callback sees every step
            bar.set_postfix(success=f"{metrics['success']:.2f}", ret=f"{metrics['mean_return']:.1f}", refresh=False)
            bar.update(1)
            yield state
            if stop or k == steps:
                return
            start = time.perf_counter()
            history = [*history, replace(experience, rewards=None) if reward_free else experience][-memory:]
            watched = Trajectory.cat(history)
            if mode == "parameters":
                visited.append(experience.observations[experience.mask])
                teacher, policy = parameters_step(improver, student, watched, visited[: -len(history)])
            else:
                policy = improver.step(policy, watched, mode=mode)
            busy += time.perf_counter() - start


def collect_step(
    improver: Improver,
    actor: Any,
    teacher: BehaviourPolicy | None,
    tasks: list[Task],
    exploration: float,
    seed: int,
    earlier: Sequence[torch.Tensor],
    failed: bool,
    render: RenderConfig | None = None,
) -> tuple[Trajectory, Trajectory, Any]:
    """One step's episodes of parameters mode (or, with ``teacher=None``, of ``actor`` alone): one per
    task, the first half by ``teacher`` (the behaviour ``actor`` was last fitted to, acting with the
    task exploration the improver's settings give after a step that ``failed`` or not), the rest by
    ``actor`` in rounds, refitted to ``teacher`` after each on the ``earlier`` steps' states (each
    ``[N_i, obs_dim]``) and this step's. Returns all the episodes, the actor's own, and the actor as it
    ends the step (see :func:`_collect`).
    """
    if teacher is None:
        return _collect(actor, None, tasks, exploration, seed, render)
    sigma = improver.loop_settings.task_sigma(failed)
    guide = TaskSampling(teacher, sigma, seed=seed) if sigma else teacher
    return _collect(actor, guide, tasks, exploration, seed, render, partial(_refitted, improver, teacher, list(earlier)))


def _collect(
    actor: Any,
    teacher: Any | None,
    tasks: list[Task],
    exploration: float,
    seed: int,
    render: RenderConfig | None,
    refit: Callable[[nn.Module, torch.Tensor], nn.Module] | None = None,
) -> tuple[Trajectory, Trajectory, Any]:
    """One episode per task with ``exploration`` noise: all by ``actor`` or, given a ``teacher``,
    the first half (rounded down) by the teacher and the rest by ``actor``. Returns all the
    episodes, the actor's own, and the actor as it ends the step.

    The teacher's episodes are DAgger's mixture (Ross et al., 2011): they add the states the improved
    behaviour reaches. Given ``refit`` (parameters mode), the actor's share runs in up to
    :data:`DAGGER_ROUNDS` rounds and ``refit(actor, states)`` refits it after each on this step's
    states so far (``[N, obs_dim]``), so that later rounds visit where the refitted copy drifts: a copy
    refitted once per step needs a step per correction (push-v3, a training task: the copy stayed at
    0 for 4 steps while its teacher succeeded from step 2; refitted after each of 5 rounds, it
    succeeded at the end of step 2 already).
    """
    share = len(tasks) // 2 if teacher is not None else 0
    parts = []
    if share:
        teacher_seed = derive_seed(seed, 1)
        parts.append(rollout(ExplorationNoise(exploration, teacher_seed).wrap(teacher), tasks[:share], 1, seed=teacher_seed, render=render, progress=False))
    own_tasks = tasks[share:]
    bounds = [0, *(refit_points(len(own_tasks)) if refit is not None else [len(own_tasks)])]
    own_parts = []
    for r in range(len(bounds) - 1):
        round_seed = seed if r == 0 else derive_seed(seed, 1 + r)
        part = rollout(ExplorationNoise(exploration, round_seed).wrap(actor), own_tasks[bounds[r] : bounds[r + 1]], 1, seed=round_seed, render=render, progress=False)
        own_parts.append(part)
        if refit is not None:
            actor = refit(actor, torch.cat([p.observations[p.mask] for p in parts + own_parts]))
    own = own_parts[0] if len(own_parts) == 1 else Trajectory.cat(own_parts)
    return (own if not parts else Trajectory.cat([*parts, own])), own, actor


DAGGER_ROUNDS = 5
"""Parameters mode: the most rounds a step's own episodes are split into, the copy refitted after each."""


def refit_points(own: int) -> list[int]:
    """Parameters mode: after how many of a step's ``own`` episodes of the copy it is refitted (up to
    :data:`DAGGER_ROUNDS` rounds of even size; the last point is ``own``)."""
    rounds = min(DAGGER_ROUNDS, own)
    return [own * r // rounds for r in range(1, rounds + 1)]


def parameters_step(improver: Improver, policy: nn.Module, watched: Trajectory, earlier: Sequence[torch.Tensor]) -> tuple[BehaviourPolicy, nn.Module]:
    """Parameters mode's improvement: the behaviour improved from the ``watched`` episodes (the teacher),
    and a copy of ``policy`` fitted to it on their states and on the ``earlier`` steps' (each ``[N_i, obs_dim]``).

    One context serves both, so the copy is fitted to the teacher's own actions.
    """
    teacher = improver.step(policy, watched, mode="behaviour")
    return teacher, improver.fit_to(policy, teacher, torch.cat([watched.observations[watched.mask], *earlier]))


def _refitted(improver: Improver, teacher: nn.Module, earlier: list[torch.Tensor], student: nn.Module, states: torch.Tensor) -> nn.Module:
    """``student`` fitted to ``teacher`` on the ``earlier`` states (each ``[M_i, obs_dim]``) and this step's ``[N, obs_dim]``."""
    return improver.fit_to(student, teacher, torch.cat([*earlier, states]))


class TaskSampling:
    """A behaviour-mode policy that, per episode, acts on its inferred task moved by Gaussian noise.

    The rollout collector calls :meth:`for_task` once per episode; the offset is drawn from a
    generator seeded by ``seed`` and the episode's seed, so the same episodes get the same offsets.

    Args:
        policy: A :class:`~improver.operator.BehaviourPolicy` of an improver that infers the task.
        sigma: Standard deviation of the offset, in the task parameters' own units.
        seed: Seed of the offsets.
    """

    def __init__(self, policy: BehaviourPolicy, sigma: float, seed: int = 0) -> None:
        self.policy, self.sigma, self.seed = policy, sigma, seed

    def for_task(self, info: TaskInfo) -> BehaviourPolicy:
        """The policy shifted elsewhere for one episode."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, info.episode_seed))
        return self.policy.shifted(self.sigma * torch.randn(self.policy.net.config.task_dim, generator=generator))

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        return self.policy(observations)


def improve(
    improver: Improver,
    policy: nn.Module,
    tasks: Task | Sequence[Task] | Callable[[], gym.Env],
    steps: int = 3,
    episodes: int = 10,
    seed: int = 0,
    mode: Mode | None = None,
    **options: Any,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Run :func:`improvement_loop` to its end; ``options`` are its keyword arguments
    (``reward_free``, ``memory``, ``exploration``, ``task_exploration``, ``render``, ``callbacks``, ``progress``).
    ``mode`` and the loop settings not given are the improver's (``improver.loop_settings``).

    Returns the final policy and one row of metrics per step (step 0 is the starting policy):
    success rate, mean return, env steps used so far and wall time.
    """
    rows = []
    for state in improvement_loop(improver, policy, tasks, steps, episodes, seed=seed, mode=mode, **options):
        rows.append(state.metrics)
    return state.policy, rows


class StopOnSuccess:
    """Stop the loop once a step's success rate reaches ``threshold``."""

    def __init__(self, threshold: float = 1.0) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold is a success rate in (0, 1]; got {threshold}")
        self.threshold = threshold

    def __call__(self, state: LoopStep) -> bool:
        """``False`` (stop) once the step's success reaches the threshold."""
        return state.metrics["success"] < self.threshold


class Checkpoint:
    """Save every ``every``-th step's policy to ``folder/step-KKK`` (atomically), with its metrics.

    A policy of a class in ``improver.policies.POLICY_CLASSES`` is saved with ``save_policy`` (so
    ``load_policy`` and ``improver improve --policy`` read it); any other module as
    ``model.safetensors`` (its ``state_dict``) and ``metrics.json``, to load into your own class.
    """

    def __init__(self, folder: str | os.PathLike, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1; got {every}")
        self.folder, self.every = Path(folder), every
        self.saved: list[Path] = []

    def __call__(self, state: LoopStep) -> None:
        if state.step % self.every:
            return
        path = self.folder / f"step-{state.step:03d}"
        if type(state.policy).__name__ in POLICY_CLASSES and hasattr(state.policy, "config"):
            save_policy(state.policy, path, record={"metrics": state.metrics})
        else:
            with atomic_path(path, FolderKind("checkpoint", entries={"model.safetensors", "metrics.json"})) as tmp:
                tmp.mkdir()
                write_weights(state.policy.state_dict(), tmp / "model.safetensors")
                (tmp / "metrics.json").write_text(json.dumps(state.metrics, indent=2))
        self.saved.append(path)


class JSONLinesLog:
    """Write the metrics of every step so far to ``path``, one JSON object per line (rewritten atomically)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self.rows = Path(path), []

    def __call__(self, state: LoopStep) -> None:
        self.rows.append(state.metrics)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows))


class TensorBoardLog:
    """Log each step's numeric metrics to TensorBoard under ``prefix/`` (x axis: env steps)."""

    def __init__(self, logdir: str | os.PathLike, prefix: str = "improve") -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.prefix = SummaryWriter(str(logdir)), prefix

    def __call__(self, state: LoopStep) -> None:
        for key in ("success", "mean_return", "wall_s"):
            self.writer.add_scalar(f"{self.prefix}/{key}", state.metrics[key], state.metrics["env_steps"])
        self.writer.flush()


def improve_lesser(
    improver: Improver,
    dataset: Any,
    max_success: float = 0.3,
    steps: int = 3,
    episodes: int = 10,
    *,
    seed: int = 0,
    mode: Mode | None = None,
    progress: bool = False,
    **options: Any,
) -> tuple[list[dict[str, Any]], int]:
    """Improve each lesser policy of a dataset whose recorded success is at most ``max_success`` on its own task.

    Meant for a held-out dataset (``improver generate --split test``): its zoo policies and tasks
    were never seen in meta-training. ``options`` (``memory``, ``exploration``, ``reward_free``)
    go to :func:`improve`; ``mode`` and the settings not given are the improver's.

    Returns:
        One row per step averaged over the policies (``success``, ``mean_return``; ``env_steps``
        summed), and the number of policies improved.

    Raises:
        ValueError: if no lesser policy qualifies.
    """
    from .tasks import make_suite

    runs = []
    for i in tqdm(range(len(dataset)), desc=f"improve lesser ({mode or improver.loop_settings.mode})", unit="policy", disable=not progress):
        example = dataset.example(i)
        if example.record["success"] > max_success:
            continue
        info = example.lesser.tasks[0]
        task = make_suite(info.suite, info.suite_seed).tasks(info.split)[info.index]
        runs.append(improve(improver, example.policy, task, steps, episodes, seed, mode, **options)[1])
    if not runs:
        raise ValueError(f"no lesser policy of the dataset has success <= {max_success}")
    return pooled(runs), len(runs)


def pooled(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One table from several policies' rows (from :func:`improve`): success and mean return
    averaged over the policies, env steps and wall time summed."""
    return [
        {
            "step": k,
            "success": sum(r[k]["success"] for r in runs) / len(runs),
            "mean_return": sum(r[k]["mean_return"] for r in runs) / len(runs),
            "env_steps": sum(r[k]["env_steps"] for r in runs),
            "wall_s": sum(r[k]["wall_s"] for r in runs),
        }
        for k in range(len(runs[0]))
    ]


def heldout_success(
    improver: Improver, dataset: Any, episodes: int = 2, seed: int = 0, mode: Mode = "parameters"
) -> dict[str, float]:
    """Success of a dataset's lesser policies on their own tasks before and after one ``step``.

    Meant for a dataset of held-out tasks (``improver generate --split test``); each example's
    stored episodes are the experience the step sees.
    """
    from .tasks import make_suite

    before, after = [], []
    for i in range(len(dataset)):
        example = dataset.example(i)
        info = example.lesser.tasks[0]
        task = make_suite(info.suite, info.suite_seed).tasks(info.split)[info.index]
        improved = improver.step(example.policy, example.lesser, mode=mode)
        for policy, results in ((example.policy, before), (improved, after)):
            results.append(float(rollout(policy, task, episodes, seed=seed, progress=False).success.float().mean()))
    return {"success_before": sum(before) / len(before), "success_after": sum(after) / len(after)}
