"""stable-baselines3: improve an SB3 model's policy with ``Improver.step``.

SB3 policies return ``(actions, values, log_probs)`` and sample; the improver needs a
deterministic ``observations -> actions`` module, which :class:`SB3Actor` provides.
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from improver.dagger import dagger
from improver.loop import Callback, Mode, as_tasks, collect_step, improvement_loop, parameters_step
from improver.operator import Improver
from improver.tasks import Task
from improver.tasks.evaluation import spread
from improver.transitions import TrajectoryBuilder
from improver.types import Trajectory

try:
    from stable_baselines3.common.callbacks import BaseCallback
except ImportError:  # stable-baselines3 is optional (the `baselines` extra); ImproverCallback says so when built
    BaseCallback = object


class SB3Actor(nn.Module):
    """The deterministic action (the action distribution's mode) of an SB3 ``ActorCriticPolicy``."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Mode of ``pi(. | observations)``, ``[B, act_dim]`` (differentiable)."""
        return self.policy.get_distribution(observations).mode()


def improve_sb3(improver: Improver, model: Any, experience: Trajectory, extra_states: torch.Tensor | None = None) -> Any:
    """One improvement step of ``model.policy`` (PPO, A2C, ...), written back into ``model``.

    ``extra_states`` ``[N, obs_dim]``: more states to fit on (see :meth:`Improver.step`).
    Returns ``model``, which keeps predicting, learning and saving as usual.
    """
    improved = improver.step(SB3Actor(model.policy), experience, extra_states=extra_states)
    model.policy.load_state_dict(improved.policy.state_dict())
    return model


def improve_sb3_on_tasks(
    improver: Improver,
    model: Any,
    tasks: Any,
    steps: int = 3,
    episodes: int = 10,
    *,
    seed: int = 0,
    mode: Mode | None = None,
    dagger_rounds: int = 3,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
    **options: Any,
) -> tuple[Any, list[dict[str, Any]]]:
    """Improve a trained SB3 model on ``tasks`` with :func:`improver.loop.improvement_loop`.

    Each step collects ``episodes`` episodes and steps the policy; the final parameters are
    written back into ``model``.

    - ``mode="parameters"``: the loop steps the model's deterministic actor itself.
    - ``mode="behaviour"``: the loop improves the behaviour (``options`` such as ``exploration``
      and ``task_exploration`` go to it), and then :func:`improver.dagger.dagger` distils the final
      behaviour policy into the model's actor in ``dagger_rounds`` rounds of ``episodes`` episodes,
      starting from the states of steps 1 and on. Its rows (with ``round``) follow the loop's.

    Args:
        improver: A trained improver for the tasks' observation and action sizes.
        model: An SB3 on-policy model (PPO, A2C) with an ``ActorCriticPolicy``.
        tasks: A task, tasks, or a Gymnasium env factory (as in ``improvement_loop``).
        steps, episodes, seed, callbacks, progress: As in ``improvement_loop``.
        mode: ``"parameters"`` or ``"behaviour"`` (then distilled by DAgger); default: the improver's
            (``improver.loop_settings``, which also supply the options not given).
        dagger_rounds: DAgger rounds in behaviour mode.
        **options: More keyword arguments of ``improvement_loop``.

    Returns:
        ``model`` (which keeps predicting, learning and saving as usual) and one metrics row per
        step (and per DAgger round); ``env_steps`` counts every episode collected.
    """
    mode = mode or improver.loop_settings.mode
    if mode not in ("parameters", "behaviour"):
        raise ValueError(f"mode must be 'parameters' or 'behaviour'; got {mode!r}")
    actor = SB3Actor(model.policy)
    rows, visited = [], []
    for state in improvement_loop(
        improver, actor, tasks, steps, episodes, seed=seed, mode=mode, callbacks=callbacks, progress=progress, **options
    ):
        rows.append(state.metrics)
        if state.step:
            visited.append(state.experience.observations[state.experience.mask])
    if mode == "behaviour":
        if not visited:
            raise ValueError("behaviour mode needs at least one improvement step to distil (steps >= 1)")
        student, rounds = dagger(
            state.policy, actor, tasks, dagger_rounds, episodes, states=torch.cat(visited), seed=seed + steps + 1, progress=progress
        )
        used = rows[-1]["env_steps"]
        rows += [{**row, "env_steps": used + row["env_steps"]} for row in rounds]
    else:
        student = state.policy
    model.policy.load_state_dict(student.policy.state_dict())
    return model, rows


class ImproverCallback(BaseCallback):
    """An SB3 callback that applies ``improver.step`` to the model's actor every ``every`` rollouts.

    The step happens before every ``every``-th rollout after the first (so after PPO's own update
    of the rollout before, whose stored log-probabilities belong to the old parameters), and the
    new parameters are written into ``model.policy``. What the improver watches:

    - ``tasks`` given: ``episodes`` fresh episodes on ``tasks`` with the deterministic actor (plus
      ``exploration`` noise). Those are extra environment steps, counted in :attr:`env_steps`.
    - ``tasks=None``: the model's own rollouts, as PPO sampled them (its exploration noise
      included): the last ``episodes`` episodes that ended since the previous step. No extra
      environment steps; a step is skipped while no episode has ended. Needs a flat ``Box``
      observation space.

    Each step fits the actor on the states of every step's watched episodes so far, labelled with
    the behaviour improved from the latest ones (DAgger). With ``tasks`` given, the collection is
    parameters mode's of :func:`improver.loop.improvement_loop` (:func:`improver.loop.collect_step`):
    from the second step on, the behaviour the actor was last fitted to acts the first half of the
    episodes, and the actor is refitted to it after each round of its own. Each step's row
    (``num_timesteps``; ``success`` and ``mean_return`` of the actor's own watched episodes;
    ``any_success`` of all of them; extra ``env_steps`` so far) is kept in :attr:`history` and
    logged under ``improver/``.

    Args:
        improver: A trained improver (parameters mode).
        tasks: A task, tasks, or a Gymnasium env factory: where the improver's episodes run
            (normally the task the model learns on); ``None`` to watch the model's rollouts.
        every: Rollouts between improvement steps.
        episodes: Episodes watched per improvement step.
        seed: Seed of the collected episodes (the ``k``-th step uses ``seed + k``).
        exploration: Std of the Gaussian noise on the actor's actions in collected episodes (see
            :func:`improver.loop.improvement_loop`: it spreads the states the hidden task is inferred from);
            default: the improver's (``improver.loop_settings.exploration``).
        max_visited: Parameters mode fits on the states of earlier steps too (DAgger); at most this many
            of them are kept, the most recent, so that a long ``learn`` holds bounded memory.
        verbose: SB3 verbosity.
    """

    def __init__(
        self, improver: Improver, tasks: Any | None, every: int = 1, episodes: int = 10, seed: int = 0, exploration: float | None = None,
        max_visited: int = 100_000, verbose: int = 0,
    ) -> None:
        if BaseCallback is object:
            raise ImportError("ImproverCallback needs stable-baselines3: pip install 'policy-improver[baselines]'")
        if every < 1 or episodes < 1 or max_visited < 0:
            raise ValueError(f"every and episodes must be at least 1 and max_visited at least 0; got {every}, {episodes} and {max_visited}")
        super().__init__(verbose)
        self.improver, self.tasks = improver, None if tasks is None else spread(as_tasks(tasks), episodes)
        self.every, self.episodes, self.seed = every, episodes, seed
        self.exploration = improver.loop_settings.overridden(exploration=exploration).exploration
        self.rollouts, self.env_steps = 0, 0
        self.history: list[dict[str, Any]] = []
        # the model's rollouts, per env; the last `episodes` ended episodes are watched
        self.watched = TrajectoryBuilder(success="success", keep=episodes)
        self.max_visited = max_visited
        self.visited: torch.Tensor | None = None  # [<= max_visited, obs_dim] the latest states of earlier steps' watched episodes
        self.teacher: nn.Module | None = None  # tasks given: the behaviour the actor was last fitted to

    def _on_rollout_start(self) -> None:
        if self.rollouts and self.rollouts % self.every == 0 and (self.tasks is not None or self.watched.num_episodes):
            self.improve_now()
        self.rollouts += 1

    def _on_step(self) -> bool:
        if self.tasks is None:
            self._record(self.locals)
        return True

    def _record(self, local: dict[str, Any]) -> None:
        """Keep this step of every env; an episode that ends joins the watched ones."""
        # The builder copies the rewards, which PPO changes in place afterwards (bootstrap values).
        self.watched.add_batch(local["obs_tensor"].cpu().numpy(), local["clipped_actions"], local["rewards"], local["dones"], infos=local["infos"])

    def improve_now(self) -> dict[str, Any]:
        """Step the current actor on the watched episodes, write it back; returns the step's row."""
        if self.tasks is None and not self.watched.num_episodes:
            raise ValueError("no rollout episode has ended yet: there is nothing to watch (tasks=None)")
        earlier = [] if self.visited is None else [self.visited]
        if self.tasks is None:
            experience = own = self.watched.trajectory()
            actor = SB3Actor(self.model.policy)
        else:
            failed = not self.history or not self.history[-1]["any_success"]
            seed = self.seed + len(self.history)
            experience, own, actor = collect_step(
                self.improver, SB3Actor(self.model.policy), self.teacher, self.tasks, self.exploration, seed, earlier, failed
            )
            self.env_steps += int(experience.lengths.sum())
        self.teacher, improved = parameters_step(self.improver, actor, experience, earlier)
        self.model.policy.load_state_dict(improved.policy.state_dict())
        states = experience.observations[experience.mask]
        if self.max_visited:
            states = states if self.visited is None else torch.cat([self.visited, states])
            self.visited = states[-self.max_visited:]
        row = {
            "num_timesteps": self.num_timesteps,
            "success": float(own.success.float().mean()),
            "mean_return": float(own.returns.mean()),
            "any_success": bool(experience.success.any()),
            "env_steps": self.env_steps,
        }
        self.history.append(row)
        for key in ("success", "mean_return", "env_steps"):
            self.logger.record(f"improver/{key}", row[key])
        return row


class TqdmProgress(BaseCallback):
    """A tqdm progress bar over SB3 timesteps (SB3's own ``progress_bar=True`` needs ``rich``)."""

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.locals["total_timesteps"], initial=self.model.num_timesteps, unit="step", desc=type(self.model).__name__)

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


# --- Starting SB3 PPO from a given policy (the PPO baseline of `improver bench improve`) ---------


class TaskEnv(gym.Wrapper):
    """A :class:`~improver.tasks.Task`'s environment, made to fit stable-baselines3.

    The task's env already follows Gymnasium's API; this adds what SB3 needs on top: episodes end
    (``truncated``) after ``task.max_steps`` steps (the toy suite never ends one by itself, and the
    rollout collector cuts episodes at that horizon, so PPO sees the same episodes), and the
    observation space is ``float32`` like the observations (Meta-World declares ``float64``).
    The step info keeps ``"success"``; it also carries ``"is_success"`` at the last step, which SB3's
    logger turns into a ``rollout/success_rate`` entry.

    Args:
        task: The task whose environment to wrap.
    """

    def __init__(self, task: Task) -> None:
        super().__init__(task.make_env())
        self.task = task
        space = self.env.observation_space
        self.observation_space = gym.spaces.Box(
            np.asarray(space.low, dtype=np.float32), np.asarray(space.high, dtype=np.float32), shape=space.shape, dtype=np.float32
        )
        self._t = 0
        self._succeeded = False

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._t, self._succeeded = 0, False
        obs, info = self.env.reset(seed=seed, options=options)
        return np.asarray(obs, dtype=np.float32), info

    def step(self, action: np.ndarray):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._t += 1
        # Meta-World's protocol: an episode succeeds if its flag is set at any step.
        self._succeeded |= bool(info.get("success", 0.0) > 0)
        truncated = bool(truncated) or self._t >= self.task.max_steps
        if terminated or truncated:
            info = {**info, "is_success": self._succeeded}
        return np.asarray(obs, dtype=np.float32), float(reward), bool(terminated), truncated, info


def _make_tanh_mean_policy() -> type:
    # Built on first use so that importing this module does not need stable-baselines3 installed.
    from stable_baselines3.common.policies import ActorCriticPolicy

    class TanhMeanPolicy(ActorCriticPolicy):
        """SB3's ``MlpPolicy`` whose Gaussian mean is ``tanh(action_net(latent))``.

        ``MLPPolicy`` ends in tanh; SB3 offers a tanh squash only with gSDE, so the squash is put
        on the mean instead: the deterministic action is then exactly the ``MLPPolicy``'s, while
        sampled actions are ``mean + noise``, clipped to the action bounds by SB3 as usual.
        """

        def _build(self, lr_schedule: Any) -> None:
            super()._build(lr_schedule)
            # Tanh has no parameters, so the optimizer built in super()._build still holds all of them.
            self.action_net = nn.Sequential(self.action_net, nn.Tanh())

    # Named as an attribute of this module (see __getattr__), so model.save/PPO.load find it by reference.
    TanhMeanPolicy.__module__ = __name__
    TanhMeanPolicy.__qualname__ = "TanhMeanPolicy"
    return TanhMeanPolicy


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """``TanhMeanPolicy``: the ``ActorCriticPolicy`` subclass :func:`ppo_from_policy` uses (built on first access)."""
    if name == "TanhMeanPolicy":
        if name not in _LAZY:
            _LAZY[name] = _make_tanh_mean_policy()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ppo_from_policy(policy: nn.Module, env: Any, **ppo_kwargs: Any) -> Any:
    """An SB3 ``PPO`` model whose actor starts as ``policy`` (an :class:`~improver.policies.MLPPolicy`).

    The actor gets ``net_arch=dict(pi=hidden, vf=hidden)`` with Tanh activations, the policy's
    hidden layers are copied into ``mlp_extractor.policy_net`` and its output layer into
    ``action_net``; the critic starts fresh. The mean action is squashed with tanh (see
    ``TanhMeanPolicy``), so ``model.predict(obs, deterministic=True)`` and
    ``SB3Actor(model.policy)`` act exactly like ``policy`` before any learning.

    Args:
        policy: An ``MLPPolicy`` (its ``config`` gives the architecture); it is not modified.
        env: A Gymnasium env, an SB3 ``VecEnv``, or a :class:`~improver.tasks.Task` (wrapped in
            :class:`TaskEnv`).
        **ppo_kwargs: Passed to ``PPO`` (``n_steps``, ``learning_rate``, ``seed``, ...).
            ``policy_kwargs`` are merged over the ones set here; ``log_std_init`` defaults to -1
            (std 0.37 on actions in [-1, 1]) because SB3's default std of 1 would replace a
            fine-tuned policy's behaviour with noise from the first update.

    Raises:
        TypeError: ``policy`` is not an ``MLPPolicy``.
        ValueError: the policy's observation or action size differs from the env's, or
            ``policy_kwargs`` ask for another architecture.
    """
    from stable_baselines3 import PPO

    from improver.policies import MLPPolicy

    if not isinstance(policy, MLPPolicy):
        raise TypeError(f"ppo_from_policy starts PPO from an MLPPolicy; got a {type(policy).__name__}")
    if isinstance(env, Task):
        env = TaskEnv(env)
    obs_dim, act_dim, hidden = policy.config["obs_dim"], policy.config["act_dim"], list(policy.config["hidden"])
    if tuple(env.observation_space.shape) != (obs_dim,) or tuple(env.action_space.shape) != (act_dim,):
        raise ValueError(
            f"the policy maps {obs_dim} observations to {act_dim} actions; the env has observation shape "
            f"{tuple(env.observation_space.shape)} and action shape {tuple(env.action_space.shape)}"
        )
    defaults = {"net_arch": {"pi": hidden, "vf": hidden}, "activation_fn": nn.Tanh, "log_std_init": -1.0}
    policy_kwargs = {**defaults, **ppo_kwargs.pop("policy_kwargs", {})}
    if policy_kwargs["net_arch"] != defaults["net_arch"] and list(policy_kwargs["net_arch"].get("pi", [])) != hidden:
        raise ValueError(f"policy_kwargs net_arch {policy_kwargs['net_arch']} does not match the policy's hidden layers {hidden}")
    if policy_kwargs["activation_fn"] is not nn.Tanh:
        raise ValueError("the MLPPolicy uses Tanh activations; policy_kwargs activation_fn must be nn.Tanh")
    ppo_kwargs.setdefault("device", "cpu")
    model = PPO(__getattr__("TanhMeanPolicy"), env, policy_kwargs=policy_kwargs, **ppo_kwargs)
    linears = [m for m in policy.net if isinstance(m, nn.Linear)]
    targets = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, nn.Linear)] + [model.policy.action_net[0]]
    with torch.no_grad():
        for source, target in zip(linears, targets, strict=True):
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)
    return model
