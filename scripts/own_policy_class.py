"""Parameters mode on a policy class the package has never seen, from a fresh initialisation.

The class below is defined here only (LayerNorm, ReLU, a residual block: nothing like the package's
``MLPPolicy``). For each held-out task and seed a freshly initialised one is improved by the loop in
parameters mode, and its copy after each step is scored without noise, as ``improver bench improve``
scores its contenders. Prints the table and writes ``OUT/results.json``::

    python scripts/own_policy_class.py --suite ML1:push-v3 --improver pretrained/push-v3/improver --out runs/own-class-push
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from improver import Improver, make_suite
from improver.bench.contenders import improver_rows
from improver.bench.statistics import mean_ci
from improver.io import atomic_path


class ResidualPolicy(nn.Module):
    """``[B, obs_dim] -> [B, act_dim]`` in ``[-1, 1]``: normalised input, two ReLU layers with a skip, tanh."""

    def __init__(self, obs_dim: int, act_dim: int, width: int = 128) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(obs_dim), nn.Linear(obs_dim, width), nn.ReLU())
        self.block = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.out = nn.Linear(width, act_dim)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        h = self.inp(observations)
        return torch.tanh(self.out(torch.relu(h + self.block(h))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="ML1:push-v3")
    parser.add_argument("--improver", type=Path, default=Path("pretrained/push-v3/improver"))
    parser.add_argument("--tasks", type=int, default=10, help="held-out tasks, the suite's first ones")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0, 1000, ... per task (as improver bench improve)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    improver = Improver.from_pretrained(args.improver)
    suite = make_suite(args.suite)
    settings = improver.loop_settings.overridden(mode="parameters")
    units = []
    for seed in tqdm([1000 * i for i in range(args.seeds)], desc="seeds"):
        for task in tqdm(suite.tasks("test")[: args.tasks], desc="tasks", leave=False):
            torch.manual_seed(seed + task.index)
            policy = ResidualPolicy(suite.observation_dim, suite.action_dim)
            rows = improver_rows(improver, policy, [task], settings, args.steps, args.episodes, seed)
            units.append({"task": task.index, "seed": seed, "rows": rows})
    table = []
    for k in range(args.steps + 1):
        success, ci = mean_ci([u["rows"][k]["success"] for u in units])
        table.append({"step": k, "env_steps": units[0]["rows"][k]["env_steps"], "success": success, "success_ci95": ci})
    print(f"{args.suite}, ResidualPolicy from a fresh initialisation, parameters mode, {len(units)} units")
    print("| step | env steps | success | 95% CI |\n|---|---|---|---|")
    for r in table:
        print(f"| {r['step']} | {r['env_steps']} | {r['success']:.2f} | {r['success_ci95'] or 0:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"suite": args.suite, "improver": str(args.improver), "loop_settings": asdict(settings), "table": table, "units": units}
    with atomic_path(args.out / "results.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
