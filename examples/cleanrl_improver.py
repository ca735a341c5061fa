"""CleanRL-style single file: CleanRL's PPO loop (continuous actions) with the PPO update replaced
by one ``improver.step`` line.

Read top to bottom: config, agent, collect, update, log. No value function, no advantages, no
minibatches: the improver watches the episodes and returns the next policy.

    python examples/cleanrl_improver.py --env-id ML1:reach-v3 --improver pretrained/reach-v3/improver
    tensorboard --logdir runs/cleanrl
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from improver.operator import Improver
from improver.tasks import make_suite, rollout


@dataclass
class Args:
    env_id: str = "ML1:reach-v3"
    """the suite whose held-out tasks the agent learns on"""
    improver: Path = Path("pretrained/reach-v3/improver")
    """the trained improver that replaces the PPO update"""
    seed: int = 1
    """seed of the experiment"""
    num_iterations: int = 5
    """the number of policy updates"""
    num_episodes: int = 10
    """episodes collected per update (spread over the tasks)"""
    num_tasks: int = 1
    """held-out tasks the agent learns on"""
    mode: Literal["parameters", "behaviour"] = "parameters"
    """`parameters`: the agent keeps its own weights; `behaviour`: act with the improver's head"""
    log_dir: Path = Path("runs/cleanrl")
    """TensorBoard folder"""


class Agent(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int) -> None:
        super().__init__()
        self.actor_mean = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, act_dim))
        for m in self.actor_mean:
            if isinstance(m, nn.Linear):  # CleanRL's orthogonal initialisation
                nn.init.orthogonal_(m.weight, np.sqrt(2) if m.out_features != act_dim else 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.actor_mean(x))


def main(args: Args) -> list[float]:
    run_name = f"{args.env_id.replace(':', '_')}__{args.seed}__{int(time.time())}"
    writer = SummaryWriter(str(args.log_dir / run_name))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    suite = make_suite(args.env_id)
    tasks = suite.tasks("test")[: args.num_tasks]
    agent = Agent(suite.observation_dim, suite.action_dim)
    improver = Improver.from_pretrained(args.improver)

    global_step, start_time, successes = 0, time.time(), []
    for iteration in range(1, args.num_iterations + 2):
        # collect: the agent's own episodes (CleanRL's rollout phase)
        episodes = [tasks[i % len(tasks)] for i in range(args.num_episodes)]
        experience = rollout(agent, episodes, 1, seed=args.seed * 1000 + iteration, progress=False)
        global_step += int(experience.lengths.sum())
        successes.append(float(experience.success.float().mean()))
        writer.add_scalar("charts/episodic_return", float(experience.returns.mean()), global_step)
        writer.add_scalar("charts/success_rate", successes[-1], global_step)
        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
        print(f"iteration={iteration - 1}, global_step={global_step}, success={successes[-1]:.2f}, return={experience.returns.mean():.1f}")
        if iteration > args.num_iterations:
            break

        # update: where CleanRL computes advantages and runs PPO epochs
        agent = improver.step(agent, experience, mode=args.mode)

    writer.close()
    return successes


if __name__ == "__main__":
    main(tyro.cli(Args))
