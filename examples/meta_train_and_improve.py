"""Meta-train an improver on a task family, then improve policies on its held-out tasks.

Every step is one of the package's own commands (``improver.cli.main`` takes the arguments of the
``improver`` console script):

    improver generate --suite ML1:reach-v3 --out runs/reach-v3/train --tasks 20
    improver generate --suite ML1:reach-v3 --split test --out runs/reach-v3/heldout --tasks 6
    improver meta-train --data runs/reach-v3/train --out runs/reach-v3/run --steps 1500 --lr 1e-3 --distill-weight 0

then the held-out zoo policies that mostly fail are improved, with success and return printed
before and after.

    python examples/meta_train_and_improve.py                       # ML1:reach-v3, the recipe of scripts/train_pretrained.sh
    python examples/meta_train_and_improve.py --suite ML1:push-v3 --out runs/push
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from improver.augment.dataset import ImprovementDataset
from improver.cli import main as improver_cli
from improver.loop import improve_lesser
from improver.operator import Improver
from improver.tasks.evaluation import format_table


@dataclass
class Args:
    suite: str = "ML1:reach-v3"
    """Task family (any registered suite)."""
    out: Path = Path("runs/reach-v3")
    """Folder for the datasets and the meta-training run."""
    train_tasks: int = 20
    """Training tasks to generate data on."""
    heldout_tasks: int = 6
    """Held-out tasks whose zoo policies are improved."""
    preset: Literal["tiny", "demo", "full"] = "demo"
    """Dataset size preset of `improver generate`."""
    meta_steps: int = 1500
    """Meta-training steps."""
    token_stride: int = 10
    """One experience token every this many env steps (1 for short episodes)."""
    lr: float = 1e-3
    """Meta-training learning rate."""
    improver: Path | None = None
    """A trained improver to use instead of meta-training one."""
    max_success: float = 0.3
    """Improve the held-out policies with at most this success rate."""
    steps: int = 3
    """Improvement steps per policy."""
    episodes: int = 10
    """Episodes per improvement step."""
    mode: Literal["behaviour", "parameters"] = "behaviour"
    """Act with the improver's head, or distil into the policy's own parameters."""


def main(args: Args) -> list[dict]:
    common = ["--suite", args.suite, "--preset", args.preset]
    improver_cli(["generate", *common, "--out", str(args.out / "train"), "--tasks", str(args.train_tasks)])
    improver_cli(["generate", *common, "--split", "test", "--out", str(args.out / "heldout"), "--tasks", str(args.heldout_tasks)])
    if args.improver is None:
        improver_cli([
            "meta-train", "--data", str(args.out / "train"), "--out", str(args.out / "run"), "--steps", str(args.meta_steps),
            "--token-stride", str(args.token_stride), "--lr", str(args.lr), "--distill-weight", "0", "--checkpoint-every", "500",
        ])  # fmt: skip
    improver = Improver.from_pretrained(args.improver or args.out / "run" / "improver")
    heldout = ImprovementDataset(args.out / "heldout")
    table, count = improve_lesser(improver, heldout, args.max_success, args.steps, args.episodes, mode=args.mode, progress=True)
    print(f"{count} held-out policies of {args.suite} (success <= {args.max_success}), improved in {args.mode} mode:")
    print(format_table(table))
    first, last = table[0], table[-1]
    print(f"held-out success {first['success']:.3f} -> {last['success']:.3f}, "
          f"mean return {first['mean_return']:.2f} -> {last['mean_return']:.2f}")
    return table


if __name__ == "__main__":
    main(tyro.cli(Args))
