"""Any stream of transitions, one step or one whole episode at a time, as a :class:`~improver.types.Trajectory`.

The package's own :func:`improver.tasks.rollout` returns a ``Trajectory``; experience collected
anywhere else (an SB3 rollout, Meta-World's evaluation harness, a loop of your own) goes through a
:class:`TrajectoryBuilder`::

    builder = TrajectoryBuilder(success="is_success")
    obs, _ = env.reset()
    for _ in range(1000):
        action = policy(obs)
        next_obs, reward, terminated, truncated, info = env.step(action)
        builder.add(obs, action, reward, terminated, truncated, info)   # obs: the state acted on
        obs = env.reset()[0] if terminated or truncated else next_obs
    experience = builder.trajectory()   # the finished episodes, padded and masked
    policy = improver.step(policy, experience)
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from .types import TaskInfo, Trajectory

SuccessFn = Callable[[np.ndarray, np.ndarray, float, Mapping[str, Any]], bool]
"""``success(observation, action, reward, info) -> bool`` for one step (``info`` is ``{}`` when none was given)."""

SuccessSource = Literal["success", "is_success"] | SuccessFn | None
"""Where a step's success flag comes from: an info key, a function, or ``None`` (never successful)."""


def unknown_task(index: int = 0, episode_seed: int = -1) -> TaskInfo:
    """The neutral :class:`TaskInfo` of an episode whose task the collector does not know.

    Its names are ``"unknown"``, its task parameters empty (``parameters=()``), its seeds 0 and
    ``episode_seed``; the improver's step never reads them (only meta-training does).

    Args:
        index: Recorded as the task index (:class:`TrajectoryBuilder` puts the environment's index there).
        episode_seed: Recorded as the episode's seed (-1: unknown).
    """
    return TaskInfo("unknown", "unknown", "unknown", index, 0, episode_seed, (), "unknown")


class _Episode(NamedTuple):
    observations: np.ndarray  # [T, obs_dim] float32
    actions: np.ndarray  # [T, act_dim] float32
    rewards: np.ndarray | None  # [T] float32
    successes: np.ndarray  # [T] bool
    task: TaskInfo


class TrajectoryBuilder:
    """Collects transitions of one or several environments run side by side and returns the episodes
    that ended as a padded, masked :class:`Trajectory`.

    Each environment (an index ``env``, 0 for a single one) has one running episode; a step with
    ``terminated`` or ``truncated`` ends it, and the next step of that environment starts another.
    Every step given must be a real transition ``(s_t, a_t, r_t)`` with ``s_t`` the observation the action
    was taken on: Gymnasium's vector environments in ``AutoresetMode.SAME_STEP`` (Meta-World's) and
    SB3's ``VecEnv`` give exactly that; with the default ``NEXT_STEP`` mode, skip the reset step that
    follows an episode's end. Values are copied, so the caller may reuse its arrays.

    Args:
        success: Where each step's success flag comes from (an episode succeeds if any step's flag
            is set, Meta-World's protocol): ``"success"`` (Meta-World's and the package's envs) or
            ``"is_success"`` (SB3, Gymnasium-Robotics): that key of the step's ``info``, a number
            above 0 or ``True`` is a success and a missing key is not; a function
            ``(observation, action, reward, info) -> bool``; or ``None``: no step is a success
            (every flag False, so ``Trajectory.success`` is all False: give a source if the
            improver should tell successes apart).
        task: The :class:`TaskInfo` recorded with every episode, or one per environment (see
            :meth:`set_task`); default: :func:`unknown_task` with the environment's index.
        keep: Keep at most this many ended episodes, dropping the oldest (default: all).

    Raises:
        ValueError: ``success`` is neither a known key, a function nor ``None``, or ``keep`` < 1.
    """

    def __init__(self, success: SuccessSource = "success", task: TaskInfo | Sequence[TaskInfo] | None = None, keep: int | None = None) -> None:
        if not (success is None or success in ("success", "is_success") or callable(success)):
            raise ValueError(f"success must be 'success', 'is_success', a function (observation, action, reward, info) -> bool, or None; got {success!r}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive number of episodes or None; got {keep!r}")
        self.success, self.keep = success, keep
        per_env = [] if task is None or isinstance(task, TaskInfo) else list(task)
        if not all(isinstance(t, TaskInfo) for t in per_env):
            raise ValueError(f"task must be a TaskInfo or a sequence of them, one per environment; got {task!r}")
        self._common = task if isinstance(task, TaskInfo) else None
        self._tasks: dict[int, TaskInfo] = dict(enumerate(per_env))
        self._running: dict[int, list[tuple[np.ndarray, np.ndarray, float, bool]]] = {}
        self._ended: list[_Episode] = []
        self._dims: tuple[int, int] | None = None  # (obs_dim, act_dim), fixed by the first step or episode

    @property
    def num_episodes(self) -> int:
        """Number of ended episodes held (what :meth:`trajectory` returns)."""
        return len(self._ended)

    def task(self, env: int = 0) -> TaskInfo:
        """The :class:`TaskInfo` recorded with environment ``env``'s episodes."""
        return self._tasks.get(env) or self._common or unknown_task(env)

    def set_task(self, task: TaskInfo, env: int = 0) -> None:
        """Record ``task`` with environment ``env``'s episodes from its running one on (e.g. at a new task)."""
        if not isinstance(task, TaskInfo):
            raise ValueError(f"task must be a TaskInfo; got {type(task).__name__}")
        self._tasks[env] = task

    def add(
        self,
        observation: Any,
        action: Any,
        reward: float,
        terminated: bool,
        truncated: bool = False,
        info: Mapping[str, Any] | None = None,
        *,
        env: int = 0,
    ) -> bool:
        """Record one step of environment ``env``.

        Args:
            observation: ``[obs_dim]``, the observation the action was taken on.
            action: ``[act_dim]``, the action taken.
            reward: The step's reward.
            terminated: Whether the episode ended at this step (SB3's ``dones`` may go here).
            truncated: Whether it was cut off at this step.
            info: The step's info (read by an info-key ``success`` source; ``None`` counts as ``{}``
                for a function).
            env: Index of the environment.

        Returns:
            Whether the step ended its episode.

        Raises:
            ValueError: an observation or action is not a flat vector of the size of the earlier ones,
                the reward is not a number, or the success source is an info key and ``info`` is ``None``.
        """
        if np.ndim(observation) > 1 or np.ndim(action) > 1:
            raise ValueError(
                f"add takes one step of one environment: a flat observation and action; got shapes {np.shape(observation)} "
                f"and {np.shape(action)} (use add_batch for several environments)"
            )
        # np.array copies: SB3, for one, changes its reward array in place after the step
        obs, act = np.array(observation, dtype=np.float32).reshape(-1), np.array(action, dtype=np.float32).reshape(-1)
        self._check_dims(obs.shape[0], act.shape[0], f"env {env}")
        if np.ndim(reward) != 0:
            raise ValueError(f"reward must be one number; got shape {np.shape(reward)}")
        steps = self._running.setdefault(env, [])
        steps.append((obs, act, float(reward), self._step_success(obs, act, float(reward), info)))
        if not (terminated or truncated):
            return False
        observations, actions, rewards, successes = (np.stack(column) for column in zip(*steps))
        self._finish(_Episode(observations, actions, rewards.astype(np.float32), successes.astype(bool), self.task(env)))
        self._running[env] = []
        return True

    def add_batch(
        self,
        observations: Any,
        actions: Any,
        rewards: Any,
        terminated: Any,
        truncated: Any = None,
        infos: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Record one step of environments ``0..N-1`` run side by side.

        Args:
            observations: ``[N, obs_dim]``, the observations the actions were taken on.
            actions: ``[N, act_dim]`` (or ``[N]`` for one action component).
            rewards: ``[N]``.
            terminated: ``[N]`` bool (SB3's ``dones`` may go here).
            truncated: ``[N]`` bool, or ``None``: none truncated.
            infos: One info per environment (SB3's list of dicts), a Gymnasium vector env's info (a
                dict of ``[N]`` arrays with ``"_key"`` masks), or ``None``.

        Returns:
            The indices of the environments whose episode ended at this step.
        """
        observations, actions = np.asarray(observations), np.asarray(actions)
        actions = actions[:, None] if actions.ndim == 1 else actions  # one action component (SB3's Discrete spaces)
        n = observations.shape[0] if observations.ndim == 2 else 0
        columns = {"actions": actions, "rewards": np.asarray(rewards), "terminated": np.asarray(terminated)}
        if truncated is not None:
            columns["truncated"] = np.asarray(truncated)
        if n < 1 or actions.ndim != 2 or any(value.shape[:1] != (n,) for value in columns.values()):
            shapes = {"observations": observations.shape, **{k: v.shape for k, v in columns.items()}}
            raise ValueError(f"add_batch takes [N, obs_dim] observations and N actions, rewards and flags; got shapes {shapes}")
        per_env = _split_infos(infos, n)
        truncated = columns.get("truncated", np.zeros(n, dtype=bool))
        return [
            i
            for i in range(n)
            if self.add(observations[i], actions[i], rewards[i], bool(terminated[i]), bool(truncated[i]), per_env[i], env=i)
        ]

    def add_episode(
        self,
        observations: Any,
        actions: Any,
        rewards: Any | None = None,
        successes: Any | None = None,
        *,
        infos: Sequence[Mapping[str, Any]] | None = None,
        task: TaskInfo | None = None,
    ) -> None:
        """Record one whole episode that has ended.

        Args:
            observations: ``[T, obs_dim]``, the observations the actions were taken on.
            actions: ``[T, act_dim]``.
            rewards: ``[T]``, or ``None`` for a reward-free episode (then every episode of the
                trajectory must be reward-free; the improver needs a ranking reward model for it).
            successes: ``[T]`` success flags; default: from the builder's success source, reading
                ``infos`` (one per step).
            infos: One info per step, for the success source when ``successes`` is not given.
            task: Its :class:`TaskInfo` (default: environment 0's, see :meth:`task`).

        Raises:
            ValueError: the arrays are empty or their shapes do not agree.
        """
        obs, act = np.array(observations, dtype=np.float32), np.array(actions, dtype=np.float32)
        if obs.ndim != 2 or act.ndim != 2 or len(obs) == 0 or len(act) != len(obs):
            raise ValueError(f"an episode needs [T, obs_dim] observations and [T, act_dim] actions with T >= 1; got {obs.shape} and {act.shape}")
        steps = len(obs)
        self._check_dims(obs.shape[1], act.shape[1], "this episode")
        rew = None if rewards is None else np.array(rewards, dtype=np.float32)
        if rew is not None and rew.shape != (steps,):
            raise ValueError(f"rewards must be [T] = [{steps}]; got {rew.shape}")
        if successes is not None:
            flags = np.array(successes)
            if flags.shape != (steps,):
                raise ValueError(f"successes must be [T] = [{steps}]; got {flags.shape}")
            flags = flags.astype(bool)
        else:
            if infos is not None and len(infos) != steps:
                raise ValueError(f"infos must hold one info per step ({steps}); got {len(infos)}")
            if rew is None and callable(self.success):
                raise ValueError("a success function needs the rewards; give rewards or successes")
            flags = np.array(
                [self._step_success(obs[t], act[t], 0.0 if rew is None else float(rew[t]), None if infos is None else infos[t]) for t in range(steps)],
                dtype=bool,
            )
        self._finish(_Episode(obs, act, rew, flags, task if task is not None else self.task(0)))

    def trajectory(self, clear: bool = True) -> Trajectory:
        """The ended episodes, oldest first, as one :class:`Trajectory` padded to the longest.

        Args:
            clear: Forget them afterwards (the running episodes are kept either way).

        Returns:
            A ``Trajectory`` of ``B = num_episodes`` episodes: observations ``[B, T, obs_dim]``, actions
            ``[B, T, act_dim]``, rewards ``[B, T]`` (``None`` if the episodes are reward-free),
            successes and mask ``[B, T]``, zeros on padding.

        Raises:
            ValueError: no episode has ended yet, some episodes have rewards and some not, or a
                value of a real step is NaN, infinite or huge (see :class:`Trajectory`).
        """
        episodes = self._ended
        if not episodes:
            raise ValueError("no episode has ended yet: a Trajectory needs at least one (end one with terminated or truncated)")
        if len({e.rewards is None for e in episodes}) > 1:
            raise ValueError("some episodes have rewards and some are reward-free; a Trajectory holds one kind")
        batch, steps = len(episodes), max(len(e.observations) for e in episodes)
        obs_dim, act_dim = self._dims
        observations = np.zeros((batch, steps, obs_dim), np.float32)
        actions = np.zeros((batch, steps, act_dim), np.float32)
        rewards = np.zeros((batch, steps), np.float32)
        successes, mask = np.zeros((batch, steps), bool), np.zeros((batch, steps), bool)
        for i, episode in enumerate(episodes):
            t = len(episode.observations)
            observations[i, :t], actions[i, :t], successes[i, :t], mask[i, :t] = episode.observations, episode.actions, episode.successes, True
            if episode.rewards is not None:
                rewards[i, :t] = episode.rewards
        trajectory = Trajectory(
            observations=torch.from_numpy(observations),
            actions=torch.from_numpy(actions),
            rewards=None if episodes[0].rewards is None else torch.from_numpy(rewards),
            successes=torch.from_numpy(successes),
            mask=torch.from_numpy(mask),
            tasks=tuple(e.task for e in episodes),
        )
        if clear:
            self._ended = []
        return trajectory

    def clear(self, running: bool = False) -> None:
        """Forget the ended episodes, and with ``running`` the running ones too (e.g. after an env reset)."""
        self._ended = []
        if running:
            self._running = {}

    def _check_dims(self, obs_dim: int, act_dim: int, where: str) -> None:
        if obs_dim == 0 or act_dim == 0:
            raise ValueError(f"{where}: observations and actions need at least one component; got sizes {obs_dim} and {act_dim}")
        if self._dims is None:
            self._dims = (obs_dim, act_dim)
        elif self._dims != (obs_dim, act_dim):
            raise ValueError(
                f"{where}: {obs_dim}-d observations and {act_dim}-d actions, but the earlier steps had {self._dims[0]} and {self._dims[1]}"
            )

    def _step_success(self, observation: np.ndarray, action: np.ndarray, reward: float, info: Mapping[str, Any] | None) -> bool:
        if self.success is None:
            return False
        if callable(self.success):
            return bool(self.success(observation, action, reward, {} if info is None else info))
        if info is None:
            raise ValueError(
                f"success is read from info[{self.success!r}] but no info was given; pass the step's info, "
                "or build the TrajectoryBuilder with a success function or success=None"
            )
        return float(info.get(self.success, 0.0)) > 0

    def _finish(self, episode: _Episode) -> None:
        self._ended.append(episode)
        if self.keep is not None:
            del self._ended[: -self.keep]


def _split_infos(infos: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None, n: int) -> list[Mapping[str, Any] | None]:
    """One info per environment from a list of infos, a Gymnasium vector info, or ``None``."""
    if infos is None:
        return [None] * n
    if isinstance(infos, Mapping):
        return [_env_info(infos, i) for i in range(n)]
    if len(infos) != n:
        raise ValueError(f"got {len(infos)} infos for {n} environments")
    return list(infos)


def _env_info(infos: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Environment ``i``'s entries of a Gymnasium vector env's info: ``{key: [N] values, "_key": [N] bool}``,
    the mask set where that environment gave the key. In ``SAME_STEP`` autoreset mode an environment whose
    episode ended has been reset already: its step's info is under ``"final_info"``, which is read instead."""
    final = infos.get("final_info")
    if isinstance(final, Mapping) and bool(np.asarray(infos.get("_final_info", np.zeros(i + 1, bool)))[i]):
        infos = final
    return {k: v[i] for k, v in infos.items() if not k.startswith("_") and np.ndim(v) >= 1 and bool(np.asarray(infos.get(f"_{k}", [True] * (i + 1)))[i])}
