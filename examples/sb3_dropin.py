"""stable-baselines3 drop-in: PPO with the improver in place of (the start of) its own update.

Two ways in:

- default: ``ImproverCallback`` applies ``improver.step`` (parameters mode) to the model's actor
  before every ``--every``-th rollout and writes the new parameters back;
- ``--behaviour``: ``improve_sb3_on_tasks`` first runs ``--steps`` improvement steps in behaviour
  mode (with goal exploration), distils the improved behaviour into PPO's actor by DAgger, and
  PPO then learns on from there.

Either way the model learns, predicts and saves as usual. ``--compare`` trains plain PPO from the
same start. ``--checks`` scores both (deterministic actor, ``--eval-episodes`` episodes) at those
PPO timesteps; the printed curves give env steps with the improver's own episodes included.

    python examples/sb3_dropin.py [--timesteps 20000] [--compare]
    python examples/sb3_dropin.py --start pretrained/push-v3/lesser/00 --improver pretrained/push-v3/improver \\
        --behaviour --task-exploration 0.04 --wide-task-exploration 0.08 --n-steps 500 --batch-size 100 --timesteps 50000 \\
        --compare --compare-timesteps 400000 --checks 10000 35000 100000 200000 300000
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from stable_baselines3 import PPO

from improver.integrations.sb3 import ImproverCallback, SB3Actor, TqdmProgress, improve_sb3_on_tasks, ppo_from_policy
from improver.operator import Improver
from improver.policies import MLPPolicy, load_policy
from improver.tasks import make_suite, rollout


@dataclass
class Args:
    suite: str = "ML1:reach-v3"
    """Suite; PPO learns on one of its held-out (test) tasks."""
    task: int = 0
    """Index of the held-out task."""
    start: Path | None = None
    """A saved MLPPolicy (save_policy folder) to start from, on the task its record names (overrides --suite, --task); default: a fresh one."""
    improver: Path = Path("pretrained/reach-v3/improver")
    """A trained improver for the suite's observation and action sizes."""
    timesteps: int = 20_000
    """PPO's own timesteps (the improver's episodes come on top, and are counted in the curves' env steps)."""
    n_steps: int = 2_000
    """PPO rollout length."""
    batch_size: int = 64
    """PPO minibatch size."""
    every: int = 2
    """Rollouts between improvement steps (callback)."""
    episodes: int = 10
    """Episodes per improvement step (and per DAgger round)."""
    exploration: float | None = None
    """Action noise in the improver's episodes (helps it locate the hidden goal); default: the improver's."""
    watch_rollouts: bool = False
    """Callback: let the improver watch PPO's own rollouts (no extra env steps) instead of collecting episodes."""
    behaviour: bool = False
    """Improve first in behaviour mode, distil into PPO's actor by DAgger, then PPO (instead of the callback)."""
    steps: int = 3
    """Behaviour mode: improvement steps before the distillation."""
    dagger_rounds: int = 3
    """Behaviour mode: DAgger rounds."""
    task_exploration: float | None = None
    """Behaviour mode: task exploration of the improvement loop; default: the improver's."""
    wide_task_exploration: float | None = None
    """Behaviour mode: task exploration after a step whose episodes all failed; default: the improver's."""
    eval_episodes: int = 10
    """Episodes of each evaluation."""
    checks: tuple[int, ...] = ()
    """PPO timesteps at which to evaluate (besides the end of each run)."""
    compare: bool = False
    """Also train plain PPO from the same start."""
    compare_timesteps: int | None = None
    """Plain PPO's timesteps (default: the same env-step budget as PPO + improver)."""
    out: Path = Path("runs/sb3_dropin")
    """Where the improved model (model.zip) and the curves (curves.json) are saved."""
    seed: int = 0
    """Seed of PPO, the starting policy and the episodes."""


def evaluate(model: PPO, task, episodes: int, seed: int) -> float:
    """Success rate of the model's deterministic actor."""
    return float(rollout(SB3Actor(model.policy), task, episodes, seed=seed, progress=False).success.float().mean())


def score(model: PPO, task, args: Args, curve: list, name: str, spent: int) -> None:
    """Append the model's success at this point (``spent``: the improver's env steps so far) to ``curve`` and print it."""
    point = {"env_steps": model.num_timesteps + spent, "ppo_timesteps": model.num_timesteps, "success": evaluate(model, task, args.eval_episodes, args.seed + 1000)}
    curve.append(point)
    print(f"{name}: success {point['success']:.2f} at {point['env_steps']} env steps", flush=True)


def learn(model: PPO, task, timesteps: int, args: Args, curve: list, name: str, spent=lambda: 0, callback=None) -> None:
    """PPO on to ``timesteps`` of its own, scored at each of ``args.checks`` on the way; ``spent()``: the improver's env steps so far."""
    for target in sorted({c for c in args.checks if model.num_timesteps < c < timesteps} | {timesteps}):
        if target > model.num_timesteps:
            model.learn(target - model.num_timesteps, callback=[TqdmProgress(), *([callback] if callback else [])], reset_num_timesteps=False)
        score(model, task, args, curve, name, spent())


def main(args: Args) -> dict:
    torch.manual_seed(args.seed)
    if args.start is not None:
        start, record = load_policy(args.start)
        task = make_suite(record["suite"], record["suite_seed"]).tasks(record["split"])[record["index"]]
    else:
        suite = make_suite(args.suite)
        task = suite.tasks("test")[args.task]
        start = MLPPolicy(suite.observation_dim, suite.action_dim)
    ppo = dict(n_steps=args.n_steps, batch_size=min(args.batch_size, args.n_steps), seed=args.seed)
    improver = Improver.from_pretrained(args.improver)

    model = ppo_from_policy(start, task, **ppo)
    curve = []
    score(model, task, args, curve, "start", 0)
    if args.behaviour:
        model, improvement = improve_sb3_on_tasks(
            improver, model, task, args.steps, args.episodes, seed=args.seed, mode="behaviour", dagger_rounds=args.dagger_rounds,
            exploration=args.exploration, task_exploration=args.task_exploration, wide_task_exploration=args.wide_task_exploration,
            progress=True,
        )
        spent = improvement[-1]["env_steps"]
        score(model, task, args, curve, "improver + DAgger", spent)
        learn(model, task, args.timesteps, args, curve, "ppo+improver", lambda: spent)
    else:
        watched = None if args.watch_rollouts else task
        callback = ImproverCallback(improver, watched, every=args.every, episodes=args.episodes, seed=args.seed, exploration=args.exploration)
        learn(model, task, args.timesteps, args, curve, "ppo+improver", lambda: callback.env_steps, callback)
        improvement, spent = callback.history, callback.env_steps
    result = {"ppo+improver": {"curve": curve, "improvement": improvement}}
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "model.zip")  # an ordinary SB3 model: PPO.load(...) predicts as usual
    loaded = PPO.load(args.out / "model.zip", device="cpu")
    print("saved and reloaded; it acts:", loaded.predict(task.make_env().reset(seed=0)[0], deterministic=True)[0])
    if args.compare:
        plain = ppo_from_policy(start, task, **ppo)
        plain_curve = [curve[0]]
        learn(plain, task, args.compare_timesteps or args.timesteps + spent, args, plain_curve, "ppo")  # default: the same env-step budget
        result["ppo"] = {"curve": plain_curve}
    (args.out / "curves.json").write_text(json.dumps(result, indent=1))
    for name, r in result.items():
        print(f"{name:>13}: " + ", ".join(f"{p['success']:.2f} at {p['env_steps']}" for p in r["curve"]) + " (success at env steps)")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
