"""stable-baselines3 drop-in: PPO whose policy the improver steps every few rollouts.

``ImproverCallback`` applies ``improver.step`` to the model's actor before every ``--every``-th
rollout and writes the new parameters back; the model then learns, predicts and saves as usual.
``--compare`` also trains plain PPO from the same start for the same number of timesteps.

    python examples/sb3_dropin.py [--timesteps 20000] [--compare]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from stable_baselines3 import PPO

from improver.integrations.sb3 import ImproverCallback, SB3Actor, TqdmProgress, ppo_from_policy
from improver.operator import Improver
from improver.policies import MLPPolicy
from improver.tasks import make_suite, rollout


@dataclass
class Args:
    suite: str = "ML1:reach-v3"
    """Suite; PPO learns on one of its held-out (test) tasks."""
    task: int = 0
    """Index of the held-out task."""
    improver: Path = Path("pretrained/reach-v3/improver")
    """A trained improver for the suite's observation and action sizes."""
    timesteps: int = 20_000
    """PPO timesteps (the improver's own episodes come on top, and are counted)."""
    n_steps: int = 2_000
    """PPO rollout length."""
    every: int = 2
    """Rollouts between improvement steps."""
    episodes: int = 10
    """Episodes per improvement step."""
    exploration: float = 0.3
    """Action noise in the improver's episodes (helps it locate the hidden goal)."""
    watch_rollouts: bool = False
    """Let the improver watch PPO's own rollouts (no extra env steps) instead of collecting episodes."""
    eval_episodes: int = 10
    """Episodes of the final evaluation."""
    compare: bool = False
    """Also train plain PPO from the same start."""
    out: Path = Path("runs/sb3_dropin")
    """Where the improved model is saved (model.zip)."""
    seed: int = 0
    """Seed of PPO, the starting policy and the episodes."""


def evaluate(model: PPO, task, episodes: int, seed: int) -> float:
    """Success rate of the model's deterministic actor."""
    return float(rollout(SB3Actor(model.policy), task, episodes, seed=seed, progress=False).success.float().mean())


def main(args: Args) -> dict:
    suite = make_suite(args.suite)
    task = suite.tasks("test")[args.task]
    torch.manual_seed(args.seed)
    start = MLPPolicy(suite.observation_dim, suite.action_dim)
    ppo = dict(n_steps=args.n_steps, batch_size=min(64, args.n_steps), seed=args.seed)

    model = ppo_from_policy(start, task, **ppo)
    watched = None if args.watch_rollouts else task
    callback = ImproverCallback(Improver.from_pretrained(args.improver), watched, every=args.every, episodes=args.episodes, seed=args.seed,
                                exploration=args.exploration)
    model.learn(args.timesteps, callback=[callback, TqdmProgress()])
    result = {
        "ppo+improver": {
            "success": evaluate(model, task, args.eval_episodes, args.seed + 1000),
            "env_steps": model.num_timesteps + callback.env_steps,
            "improver_steps": callback.history,
        }
    }
    model.save(args.out / "model.zip")  # an ordinary SB3 model: PPO.load(...) predicts as usual
    loaded = PPO.load(args.out / "model.zip", device="cpu")
    print("saved and reloaded; it acts:", loaded.predict(task.make_env().reset(seed=0)[0], deterministic=True)[0])
    if args.compare:
        plain = ppo_from_policy(start, task, **ppo)
        plain.learn(args.timesteps + callback.env_steps, callback=TqdmProgress())  # the same env-step budget
        result["ppo"] = {"success": evaluate(plain, task, args.eval_episodes, args.seed + 1000), "env_steps": plain.num_timesteps}
    for name, r in result.items():
        print(f"{name:>13}: success {r['success']:.2f} after {r['env_steps']} env steps")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
