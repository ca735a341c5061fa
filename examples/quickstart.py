"""Quickstart: improve a policy of your own architecture with the shipped reach-v3 improver.

    python examples/quickstart.py [--steps 5] [--episodes 10] [--mode parameters]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from torch import nn

import improver
from improver.tasks.evaluation import format_table


class MyPolicy(nn.Module):
    """Any ``nn.Module`` from observations ``[B, 39]`` to actions ``[B, 4]`` in [-1, 1]; the package never saw this class."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(39, 48), nn.SiLU(), nn.LayerNorm(48))
        self.head = nn.Linear(48, 4)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.body(observations)))


@dataclass
class Args:
    steps: int = 5
    """Improvement steps (a random MyPolicy starts far from any policy the improver saw: measured
    success 0, 0, 0, 0, 0.9, 1.0 over steps 0-5, return 298 -> 4778)."""
    episodes: int = 10
    """Episodes collected per step."""
    improver: str = "pretrained/reach-v3/improver"
    """A trained improver (save_pretrained folder)."""
    mode: Literal["parameters", "behaviour"] = "parameters"
    """`parameters`: a MyPolicy with new weights; `behaviour`: act with the improver's head."""
    exploration: float = 0.3
    """Action noise while collecting: spread states help the improver locate the hidden goal."""


def main(args: Args) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = improver.Improver.from_pretrained(args.improver)
    task = improver.make_suite("ML1:reach-v3").tasks("test")[0]  # a goal the improver never trained on
    policy, rows = improver.improve(model, MyPolicy(), task, steps=args.steps, episodes=args.episodes, mode=args.mode,
                                    exploration=args.exploration, progress=True)
    print(format_table(rows))
    return policy, rows


if __name__ == "__main__":
    main(tyro.cli(Args))
