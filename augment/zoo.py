"""The policy zoo: per task, small parametric policies of graded quality (the improver's ``theta_n``).

Each member is an MLP behaviour-cloned from noisy expert data; quality is graded by the noise,
the number of demonstrations and the training length of its recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from improver.distill import fit_policy
from improver.policies import MLPPolicy
from improver.tasks import RenderConfig, Suite, Task, relabel, rollout
from improver.types import Trajectory

from .noise import EpsilonGreedy, NoisyPolicy, derive_seed


@dataclass(frozen=True)
class ZooRecipe:
    """How one zoo member is made.

    Attributes:
        noise: Epsilon-greedy noise on the expert demonstrations.
        episodes: Number of demonstration episodes.
        epochs: Behaviour-cloning epochs.
        relabel: Clone the expert's clean actions on the noisy states (DART-style) instead of
            the noisy actions it executed.
    """

    noise: float
    episodes: int
    epochs: int
    relabel: bool = False


# From hopeless to good on ML1:push-v3 (measured returns about 20, 360, 1,700 and 3,700 of the expert's 4,100
# with Meta-World's scripted policy; with SmoothPushPolicy 16-44, 29-229, 24-2,769 and 85-373 of 2,800 on 10 held-out goals).
GRADED_RECIPES = (
    ZooRecipe(0.9, 1, 10),
    ZooRecipe(0.6, 2, 100),
    ZooRecipe(0.5, 2, 100, relabel=True),
    ZooRecipe(0.3, 4, 300, relabel=True),
)


@dataclass(frozen=True)
class ZooMember:
    """A lesser policy, its record and the episodes it was measured on.

    Attributes:
        policy: The trained MLP.
        record: Task, recipe, architecture, and measured success rate and mean return.
        experience: Its evaluation episodes on its task (the lesser experience).
    """

    policy: MLPPolicy
    record: dict[str, Any]
    experience: Trajectory


def train_member(
    suite: Suite,
    task: Task,
    recipe: ZooRecipe,
    *,
    seed: int,
    hidden: tuple[int, ...] = (64, 64),
    eval_episodes: int = 3,
    render: RenderConfig | None = None,
    max_steps: int | None = None,
) -> ZooMember:
    """Behaviour-clone one zoo member on ``task`` following ``recipe`` and measure it there."""
    noisy_expert = NoisyPolicy(suite.expert, EpsilonGreedy(recipe.noise), seed=derive_seed(seed, 1))
    demos = rollout(noisy_expert, task, recipe.episodes, seed=derive_seed(seed, 2), max_steps=max_steps, progress=False)
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(seed, 3))
        policy = MLPPolicy(suite.observation_dim, suite.action_dim, hidden)
    targets = relabel(suite.expert, demos) if recipe.relabel else demos.actions
    fit_policy(
        policy,
        demos.observations[demos.mask],
        targets[demos.mask],
        epochs=recipe.epochs,
        generator=torch.Generator().manual_seed(derive_seed(seed, 4)),
    )
    experience = rollout(policy, task, eval_episodes, seed=derive_seed(seed, 5), render=render, max_steps=max_steps, progress=False)
    record = {
        "suite": task.suite,
        "family": task.family,
        "split": task.split,
        "index": task.index,
        "recipe": asdict(recipe),
        "architecture": {"class": "MLPPolicy", **policy.config},
        "success": float(experience.success.float().mean()),
        "mean_return": float(experience.returns.mean()),
        "demo_env_steps": int(demos.lengths.sum()),
        "eval_env_steps": int(experience.lengths.sum()),
    }
    return ZooMember(policy, record, experience)


def plot_zoo(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Histogram of zoo members' success rates and returns (one PNG), to show the spread of quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from improver.io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].hist([r["success"] for r in records], bins=11, range=(0, 1), color="tab:blue")
    axes[0].set(xlabel="success rate on its task", ylabel="zoo members", title="Zoo success")
    axes[1].hist([r["mean_return"] for r in records], bins=20, color="tab:orange")
    axes[1].set(xlabel="mean return on its task", title="Zoo return")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
