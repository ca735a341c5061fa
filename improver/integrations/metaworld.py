"""Meta-World's own meta-learning evaluation of an improver: ``metaworld.evaluation.metalearning_evaluation``.

:class:`ImproverAgent` follows that harness's ``MetaLearningAgent`` protocol: for each task it starts
from a given policy, collects the harness's adaptation episodes with the improver's exploration noise,
calls ``Improver.step`` after each adaptation step (:meth:`ImproverAgent.adapt`), and is evaluated on
the improved policy without noise. :class:`NoAdaptationAgent` is the baseline: the starting policy
unchanged. :func:`evaluate_in_metaworld` runs both and returns Meta-World's figures side by side
(``improver metaworld-eval`` on the command line).

What the harness does (metaworld 3.1.1, read from ``metaworld/evaluation.py`` and checked):

- For each of ``num_evals`` rounds it calls ``sample_tasks`` on every sub-env (the next task), the
  agent's ``init()``, then ``adaptation_steps`` times: reset, ``adaptation_episodes`` episodes per
  sub-env through ``adapt_action``/``step``, and ``adapt()``; then evaluates with ``eval_action``.
- Evaluation counts episodes per task *name*, and all sub-envs of ML1 share one name, so with several
  sub-envs the quickest ones fill the count for all. Run one sub-env at a time:
  ``gym.make_vec("Meta-World/ML1-test", env_name=family, meta_batch_size=1, total_tasks_per_cls=tasks,
  seed=seed)`` and ``num_evals=tasks``. Its tasks are cycled in a shuffled order, each once per cycle,
  so every task is evaluated once.
- ``meta_batch_size`` must divide the tasks among the sub-envs: the default 20 fails on the 50
  tasks of ML1 (an ``AssertionError``, "Invalid division of subtasks").
- The tasks are ``metaworld.ML1(family, seed).test_tasks``, the ``test`` split of the package's
  suite ``ML1:<family>`` with suite seed ``seed``; ``seed=None`` draws new tasks each run.
- Its ``Timestep`` carries no ``info``, so no success flag reaches the agent: the agent derives it
  from the reward (``success_reward``, see :class:`ImproverAgent`).
- Adaptation episodes run to the time limit (Meta-World's 500 steps, or ``max_episode_steps``);
  evaluation episodes end at the first success (``terminate_on_success`` on). Autoreset is
  ``SAME_STEP``: a ``Timestep``'s observation is the one its action was taken on.
- It returns the success rate and return averaged over the rounds, and the success rate per task name.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from improver.augment.noise import ExplorationNoise, derive_seed
from improver.loop import TaskSampling, parameters_step, refit_points, settings_for
from improver.loop_settings import Mode
from improver.operator import BehaviourPolicy, Improver
from improver.policies import MLPPolicy, load_policy, placement
from improver.transitions import TrajectoryBuilder, unknown_task
from improver.types import Policy, Trajectory

SUCCESS_REWARD = 10.0
"""Meta-World's v2 reward functions (those of its v3 envs) reach 10 where the task is solved: reach-v3's
is ``10 * in_place``, 1 within the 5 cm that count as success (reward >= 10 and the success flag agreed
on all 600 steps of 3 noisy expert episodes); most families return 10 on success. An assumption per family."""


def _act(policy: Policy, observations: np.ndarray) -> np.ndarray:
    """``policy``'s actions ``[N, act_dim]`` (float64, as Meta-World's envs take them) for ``[N, obs_dim]`` observations."""
    device, dtype = placement(policy)
    with torch.no_grad():
        actions = policy(torch.as_tensor(observations, dtype=torch.float32).to(device, dtype))
    return actions.detach().cpu().numpy().astype(np.float64)


class NoAdaptationAgent:
    """Meta-World's ``MetaLearningAgent`` that keeps its starting policy: the baseline.

    Args:
        policy: Maps ``[N, obs_dim]`` observations to ``[N, act_dim]`` actions.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def init(self) -> None:
        """A new task: nothing to forget."""

    def reset(self, env_mask: np.ndarray) -> None:
        """Episodes of the sub-envs in ``env_mask`` ``[N]`` start: the policy keeps no state."""

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        """The policy's actions ``[N, act_dim]`` for ``[N, obs_dim]`` observations."""
        return _act(self.policy, observations)

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The same actions as :meth:`eval_action`, and no auxiliary outputs."""
        return self.eval_action(observations), {}

    def step(self, timestep: Any) -> None:
        """Ignores the transition."""

    def adapt(self) -> None:
        """Keeps the policy."""


class ImproverAgent:
    """Meta-World's ``MetaLearningAgent`` for an improver and a starting policy.

    Per task (``init``) it starts from ``policy``. Adaptation step ``k`` collects the harness's episodes
    as step ``k`` of :func:`improver.loop.improvement_loop` (seed ``s``: this agent's seed mixed with
    the task's number) would: with ``ExplorationNoise(exploration, s + k)``, and in behaviour mode the
    per-episode task exploration (:class:`~improver.loop.TaskSampling`), each episode's noise seeded by
    its number in the step. ``adapt()`` turns them into a :class:`Trajectory` with a
    :class:`~improver.transitions.TrajectoryBuilder` and steps the policy on the episodes of the last
    ``memory`` steps. Evaluation acts with the improved policy, without noise.

    Parameters mode distils as the loop does (DAgger within the loop): from the second adaptation step
    on, the first half of a step's episodes (as many as the first step had, rounded down) are acted by
    the behaviour the copy was last fitted to, and the copy is refitted to it on every state so far
    after each of :func:`improver.loop.refit_points` of its own episodes.

    The harness passes no ``info``, so a step counts as a success when its reward reaches
    ``success_reward``: an assumption about the reward (true of Meta-World's v2 rewards, see
    ``SUCCESS_REWARD``), used only to tell the improver which episodes succeeded and, in behaviour
    mode, whether to widen the task exploration; Meta-World's own figures come from its ``info``.

    Args:
        improver: A trained improver for the family's observation and action sizes.
        policy: The starting policy (an ``nn.Module`` for parameters mode); never modified. One that needs
            its task (``for_task``, a scripted expert) cannot be used: the harness does not say which task it is.
        mode, exploration, task_exploration, wide_task_exploration, memory: The loop settings; each
            left ``None`` is the improver's (``improver.loop_settings``, see ``LoopSettings.overridden``).
        success_reward: A step whose reward is at least this is a success.
        seed: Seed of the exploration noise.

    Attributes:
        settings: The loop settings in use (:class:`~improver.loop_settings.LoopSettings`).
        policy: The current task's policy: the starting one until the first ``adapt``.
        history: The experience of the current task's last ``memory`` adaptation steps.
        visited: Parameters mode: the states of every adaptation step of the current task, all
            refitted at each step (DAgger, as the improvement loop does).
        teacher: Parameters mode: the behaviour the copy was last fitted to (``None`` before the first ``adapt``).
        adapted: Adaptation steps done on the current task.
        tasks: Tasks begun (``init`` calls).

    Raises:
        ValueError: a setting is invalid (see :class:`LoopSettings`), or task exploration is asked of
            an improver that does not infer the task.
    """

    def __init__(
        self,
        improver: Improver,
        policy: Policy,
        *,
        mode: Mode | None = None,
        exploration: float | None = None,
        task_exploration: float | None = None,
        wide_task_exploration: float | None = None,
        memory: int | None = None,
        success_reward: float = SUCCESS_REWARD,
        seed: int = 0,
    ) -> None:
        self.settings = settings_for(improver, mode, exploration, task_exploration, wide_task_exploration, memory)
        if not np.isfinite(success_reward):
            raise ValueError(f"success_reward must be a finite number; got {success_reward!r}")
        self.improver, self.start, self.success_reward, self.seed = improver, policy, float(success_reward), seed
        self.tasks = 0  # tasks begun (init calls)
        self._begin_task()

    def _begin_task(self) -> None:
        self.policy: Policy = self.start
        self.history, self.failed, self.adapted = [], True, 0
        self.visited: list[torch.Tensor] = []  # parameters mode: every adaptation step's states (DAgger)
        self.teacher: BehaviourPolicy | None = None
        self._share = 0  # parameters mode: episodes of a step the teacher acts (half of the first step's)
        self._refits: set[int] = set()  # parameters mode: own episodes of a step after which the copy is refitted
        self._begin_step()

    def _begin_step(self) -> None:
        self._builder = TrajectoryBuilder(success=self._reached)
        self._actors: dict[int, Policy] = {}  # per sub-env: the running episode's noisy policy
        self._teaching: set[int] = set()  # sub-envs whose running episode the teacher acts
        self._episodes = 0  # episodes begun in this adaptation step
        self._own = 0  # the copy's episodes ended in this adaptation step (parameters mode)

    def _reached(self, observation: np.ndarray, action: np.ndarray, reward: float, info: Mapping[str, Any]) -> bool:
        return reward >= self.success_reward

    @property
    def step_seed(self) -> int:
        """Seed of the current adaptation step's noise: ``s + k`` for task seed ``s`` and step ``k``."""
        return derive_seed(self.seed, self.tasks) + self.adapted

    def init(self) -> None:
        """A new task: start again from the starting policy."""
        self.tasks += 1
        self._begin_task()

    def reset(self, env_mask: np.ndarray) -> None:
        """Evaluation episodes of the sub-envs in ``env_mask`` ``[N]`` start: the policy keeps no state."""

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        """The current policy's actions ``[N, act_dim]`` for ``[N, obs_dim]`` observations, without noise."""
        return _act(self.policy, observations)

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Exploring actions ``[N, act_dim]`` for ``[N, obs_dim]`` observations, and no auxiliary outputs."""
        actions = [_act(self._actor(i), row[None])[0] for i, row in enumerate(observations)]
        return np.stack(actions), {}

    def _actor(self, env: int) -> Policy:
        """Sub-env ``env``'s policy for its running episode, bound (noise, task offset) when the episode begins."""
        if env not in self._actors:
            info = unknown_task(self.tasks, episode_seed=self._episodes)
            teaching = self.teacher is not None and self._episodes < self._share
            self._episodes += 1
            self._builder.set_task(info, env)
            # the teacher explores the task as the improver's behaviour mode would (as in the loop)
            sigma = (self.improver.loop_settings if teaching else self.settings).task_sigma(self.failed)
            actor = self.teacher if teaching else self.policy
            if teaching:
                self._teaching.add(env)
            if sigma and isinstance(actor, BehaviourPolicy):
                actor = TaskSampling(actor, sigma, seed=self.step_seed)
            actor = ExplorationNoise(self.settings.exploration, self.step_seed).wrap(actor)
            self._actors[env] = actor.for_task(info) if hasattr(actor, "for_task") else actor
        return self._actors[env]

    def step(self, timestep: Any) -> None:
        """Record one step of every sub-env (a ``metaworld.evaluation.Timestep``: ``[N, ...]`` arrays)."""
        ended = self._builder.add_batch(timestep.observation, timestep.action, timestep.reward, timestep.terminated, timestep.truncated)
        for env in ended:
            self._actors.pop(env, None)  # the sub-env's next episode gets its own noise
            if self.teacher is not None and env not in self._teaching:
                self._own += 1
                if self._own in self._refits:  # DAgger within the step, as the loop does
                    step = self._builder.trajectory(clear=False)
                    self.policy = self.improver.fit_to(self.policy, self.teacher, torch.cat([*self.visited, step.observations[step.mask]]))
            self._teaching.discard(env)

    def adapt(self) -> None:
        """Step the policy on this adaptation step's ended episodes (and the earlier ones ``memory`` keeps).

        Raises:
            ValueError: no adaptation episode has ended since the last ``adapt``.
        """
        experience = self._builder.trajectory()
        self.failed = not bool(experience.success.any())
        self.history = [*self.history, experience][-self.settings.memory :]
        watched = Trajectory.cat(self.history)
        if self.settings.mode == "parameters":  # refit on every state so far, as the improvement loop does
            if self.teacher is None:
                self._share = experience.num_episodes // 2
                self._refits = set(refit_points(experience.num_episodes - self._share))
            self.visited.append(experience.observations[experience.mask])
            self.teacher, self.policy = parameters_step(self.improver, self.policy, watched, self.visited[: -len(self.history)])
        else:
            self.policy = self.improver.step(self.policy, watched, mode="behaviour")
        self.adapted += 1
        self._begin_step()


def make_evaluation_envs(family: str, tasks: int, seed: int | None = 0, max_episode_steps: int | None = None) -> Any:
    """Meta-World's vector env of ``tasks`` held-out tasks of ``family`` in one sub-env, as
    ``metalearning_evaluation`` needs it (run it with ``num_evals=tasks``; see the module's notes).

    Args:
        family: A Meta-World v3 task, e.g. ``"reach-v3"``.
        tasks: The first this many of the family's test tasks.
        seed: Seed of the tasks (``metaworld.ML1(family, seed)``) and the env; ``None``: new tasks each time.
        max_episode_steps: Episode length (default: Meta-World's 500).

    Raises:
        ValueError: unknown family, or ``tasks`` not between 1 and the number of test tasks.
    """
    from improver.tasks.rendering import configure_gl_backend

    configure_gl_backend()  # before mujoco is imported (see improver.tasks.rendering)
    import gymnasium as gym
    import metaworld  # registers the Meta-World/... envs

    if family not in metaworld.env_dict.ALL_V3_ENVIRONMENTS:
        raise ValueError(f"unknown Meta-World task {family!r}; choose one of {', '.join(metaworld.env_dict.ALL_V3_ENVIRONMENTS)}")
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"tasks must be at least 1; got {tasks!r}")
    if max_episode_steps is not None and max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be at least 1; got {max_episode_steps}")
    limit = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    envs = gym.make_vec("Meta-World/ML1-test", env_name=family, meta_batch_size=1, total_tasks_per_cls=tasks, seed=seed, **limit)
    available = len(envs.get_attr("tasks")[0])
    if available < tasks:
        envs.close()
        raise ValueError(f"{family} has {available} test tasks; tasks={tasks} asks for more")
    return envs


def evaluate_in_metaworld(
    improver: str | Path | Improver,
    policy: str | Path | nn.Module = "fresh",
    family: str = "reach-v3",
    tasks: int = 10,
    adaptation_steps: int = 3,
    adaptation_episodes: int = 10,
    evaluation_episodes: int = 3,
    *,
    success_reward: float = SUCCESS_REWARD,
    seed: int = 0,
    max_episode_steps: int | None = None,
    **loop_settings: Any,
) -> dict[str, Any]:
    """Meta-World's ``metalearning_evaluation`` of :class:`ImproverAgent` and of :class:`NoAdaptationAgent`.

    Both run on the first ``tasks`` test tasks of ``ML1`` ``family`` (seed ``seed``: the ``test`` split of
    the package's suite ``ML1:<family>`` with that suite seed), one task per round, in a fresh env each.
    The baseline runs with ``adaptation_steps=0``: it would ignore its adaptation episodes, and Meta-World
    resets an ML1 task to the same state, so its figures are those it would get with them, in a
    fraction of the time.

    Args:
        improver: A trained improver or its folder (``Improver.save_pretrained``).
        policy: The starting policy: a saved policy's folder (``save_policy``), a module, or ``"fresh"``
            (an untrained ``MLPPolicy`` seeded by ``seed``).
        family: A Meta-World v3 task, e.g. ``"reach-v3"``.
        tasks: Held-out tasks, each one round (``num_evals``).
        adaptation_steps, adaptation_episodes, evaluation_episodes: As in ``metalearning_evaluation``.
        success_reward: Reward of a successful step (see :class:`ImproverAgent`).
        seed: Seed of the tasks, the fresh policy and the exploration noise.
        max_episode_steps: Episode length (default: Meta-World's 500).
        **loop_settings: Loop settings of the improver agent (``mode``, ``exploration``, ``task_exploration``,
            ``wide_task_exploration``, ``memory``), as :class:`ImproverAgent` takes them; each not given is the improver's own.

    Returns:
        ``family``, ``tasks``, the harness's arguments, the improver's loop ``settings``, and ``rows``: per agent
        (``"improver"``, ``"no adaptation"``) Meta-World's ``success`` (mean success rate) and
        ``mean_return`` (mean evaluation return), and ``wall_s``.

    Raises:
        ValueError: a count is below 1 (``adaptation_steps`` below 0), or the improver or policy does not fit the family.
    """
    from metaworld.evaluation import metalearning_evaluation

    for name, value, least in (("adaptation_steps", adaptation_steps, 0), ("adaptation_episodes", adaptation_episodes, 1), ("evaluation_episodes", evaluation_episodes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer, at least {least}; got {value!r}")
    improver = improver if isinstance(improver, Improver) else Improver.from_pretrained(improver)
    obs_dim, act_dim = improver.config.obs_dim, improver.config.act_dim
    if isinstance(policy, nn.Module):
        start = policy
    elif str(policy) == "fresh":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            start = MLPPolicy(obs_dim, act_dim).eval()
    else:
        start, _ = load_policy(policy)
    agents = {
        "improver": ImproverAgent(improver, start, success_reward=success_reward, seed=seed, **loop_settings),
        "no adaptation": NoAdaptationAgent(start),
    }
    rows = []
    for name, agent in agents.items():
        envs = make_evaluation_envs(family, tasks, seed, max_episode_steps)
        try:
            spaces = (envs.single_observation_space.shape, envs.single_action_space.shape)
            if spaces != ((obs_dim,), (act_dim,)):
                raise ValueError(f"the improver maps {obs_dim}-d observations to {act_dim}-d actions; {family} has shapes {spaces[0]} and {spaces[1]}")
            began = time.perf_counter()
            success, mean_return, _ = metalearning_evaluation(
                agent, envs, num_evals=tasks, adaptation_steps=adaptation_steps if isinstance(agent, ImproverAgent) else 0,
                adaptation_episodes=adaptation_episodes, evaluation_episodes=evaluation_episodes,
            )
        finally:
            envs.close()
        rows.append({"agent": name, "success": float(success), "mean_return": float(mean_return), "wall_s": time.perf_counter() - began})
    return {
        "family": family, "tasks": tasks, "adaptation_steps": adaptation_steps, "adaptation_episodes": adaptation_episodes,
        "evaluation_episodes": evaluation_episodes, "seed": seed, "max_episode_steps": max_episode_steps,
        "settings": asdict(agents["improver"].settings), "rows": rows,
    }
