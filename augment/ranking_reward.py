"""A learned ranking reward (T-REX / D-REX): rewards for experience that comes without them.

An ensemble of small networks ``r(s)`` (optionally also seeing the latest rendered frame) is
trained so that, of two snippets of episodes from the same task, the one from the less noisy
episode has the larger summed reward (a Bradley-Terry model, Brown et al. 2019).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from improver.io import FolderKind, atomic_path
from improver.saved_files import check_keys, load_weights, read_json_object, write_weights
from improver.types import Trajectory

FORMAT_VERSION = 1


@dataclass(frozen=True)
class RewardModelConfig:
    """Settings of the ranking reward model."""

    members: int = 3
    """Ensemble size; each member trains on its own draw of pairs."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of each member's MLP."""
    snippet: tuple[int, int] = (20, 60)
    """Shortest and longest snippet, in steps."""
    pairs: int = 4000
    """Training pairs drawn per member."""
    steps: int = 800
    """Optimiser steps."""
    batch_size: int = 64
    """Pairs per step and member."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-4
    """Adam weight decay (T-REX regularises rewards to stay small)."""
    seed: int = 0
    """Seed of the initial weights and of the pair draws."""
    use_frames: bool = False
    """Also look at the latest rendered frame at each step."""


class _FrameEncoder(nn.Module):
    def __init__(self, features: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, features, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.features = features

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames.float() / 255.0)


class RewardEnsemble(nn.Module):
    """Per-step rewards ``r(s)``, the mean of ``config.members`` MLPs on normalised observations.

    Args:
        obs_dim: Observation size.
        config: Model settings.
    """

    def __init__(self, obs_dim: int, config: RewardModelConfig = RewardModelConfig()) -> None:
        super().__init__()
        self.obs_dim, self.config = obs_dim, config
        self.frame_encoder = _FrameEncoder() if config.use_frames else None
        width = obs_dim + (self.frame_encoder.features if self.frame_encoder else 0)
        self.members = nn.ModuleList(_mlp(width, config.hidden) for _ in range(config.members))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def _inputs(self, trajectory: Trajectory) -> torch.Tensor:
        if trajectory.observations.shape[-1] != self.obs_dim:
            raise ValueError(f"the reward model expects {self.obs_dim}-d observations; got {trajectory.observations.shape[-1]}")
        # Padding steps may hold anything (NaN too); zeroed, their rewards are finite and masked to 0.
        x = (torch.where(trajectory.mask[..., None], trajectory.observations, 0.0) - self.obs_mean) / self.obs_std
        if self.frame_encoder is None:
            return x
        if trajectory.frames is None:
            raise ValueError("this reward model looks at frames; collect the trajectory with render=RenderConfig(...)")
        batch, count = trajectory.frames.shape[:2]
        features = self.frame_encoder(trajectory.frames.flatten(0, 1)).view(batch, count, -1)
        # Frames come every few steps: each step sees the latest frame at or before it.
        steps = torch.arange(x.shape[1])
        latest = (torch.searchsorted(trajectory.frame_steps, steps, right=True) - 1).clamp(min=0)
        return torch.cat([x, features[:, latest]], dim=-1)

    def member_rewards(self, trajectory: Trajectory) -> torch.Tensor:
        """``[members, B, T]`` per-step rewards of each member (zero on padded steps)."""
        x = self._inputs(trajectory)
        return torch.stack([m(x).squeeze(-1) for m in self.members]) * trajectory.mask

    def predict(self, trajectory: Trajectory) -> torch.Tensor:
        """``[B, T]`` ensemble-mean reward per step (zero on padded steps)."""
        with torch.no_grad():
            return self.member_rewards(trajectory).mean(dim=0)

    def predict_returns(self, trajectory: Trajectory) -> torch.Tensor:
        """``[B]`` predicted return of each episode."""
        return self.predict(trajectory).sum(dim=1)


def _mlp(width: int, hidden: tuple[int, ...]) -> nn.Sequential:
    sizes = [width, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 1))


def _check_ranks(trajectory: Trajectory, ranks: torch.Tensor) -> None:
    if ranks.shape != (trajectory.num_episodes,):
        raise ValueError(f"need one rank per episode: {trajectory.num_episodes}; got shape {tuple(ranks.shape)}")
    if not bool(torch.isfinite(ranks).all()):
        raise ValueError("ranks contain NaN or infinite values")


def _comparable(trajectory: Trajectory, ranks: torch.Tensor) -> list[list[int]]:
    """Groups of episodes of one task that hold at least two different ranks."""
    groups: dict[tuple, list[int]] = {}
    for i, info in enumerate(trajectory.tasks):
        groups.setdefault((info.suite, info.family, info.split, info.index), []).append(i)
    usable = [g for g in groups.values() if ranks[g].unique().numel() > 1]
    if not usable:
        raise ValueError("no task has episodes of different rank: nothing to compare")
    return usable


def _episode_pairs(groups: list[list[int]], ranks: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 2]`` (worse, better) episode indices, both from one task (D-REX ranks within a task)."""
    pairs = []
    while len(pairs) < count:
        group = groups[int(torch.randint(len(groups), (1,), generator=generator))]
        i, j = (group[int(k)] for k in torch.randint(len(group), (2,), generator=generator))
        if ranks[i] != ranks[j]:
            pairs.append((i, j) if ranks[i] < ranks[j] else (j, i))
    return torch.tensor(pairs)


def sample_snippet_pairs(
    trajectory: Trajectory, ranks: torch.Tensor, count: int, snippet: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """``[count, 5]`` rows ``(worse, worse_start, better, better_start, length)``.

    Following T-REX, the better snippet never starts earlier than the worse one (unless the
    better episode ends too soon for that), so a reward that merely grows with time cannot
    explain the ranking.
    """
    _check_ranks(trajectory, ranks)
    pairs = _episode_pairs(_comparable(trajectory, ranks), ranks, count, generator)
    lengths = trajectory.lengths
    shortest = torch.minimum(lengths[pairs[:, 0]], lengths[pairs[:, 1]])
    low, high = snippet
    size = (low + (torch.rand(count, generator=generator) * (high - low + 1)).long()).clamp(max=shortest).clamp(min=1)
    worse_start = (torch.rand(count, generator=generator) * (lengths[pairs[:, 0]] - size + 1)).long()
    better_room = (lengths[pairs[:, 1]] - size - worse_start).clamp(min=0)
    better_start = (worse_start + (torch.rand(count, generator=generator) * (better_room + 1)).long()).clamp(
        max=lengths[pairs[:, 1]] - size
    )
    return torch.stack([pairs[:, 0], worse_start, pairs[:, 1], better_start, size], dim=1)


def _snippet_sums(cumulative: torch.Tensor, episode: torch.Tensor, start: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    return cumulative[episode, start + size] - cumulative[episode, start]


def train_reward_model(
    trajectory: Trajectory, ranks: torch.Tensor, config: RewardModelConfig = RewardModelConfig(), progress: bool = True
) -> RewardEnsemble:
    """Fit a :class:`RewardEnsemble` to rank snippets of ``trajectory`` by ``ranks`` ``[B]`` (larger is better)."""
    generators = [torch.Generator().manual_seed(config.seed * 1000 + m) for m in range(config.members)]
    draws = [sample_snippet_pairs(trajectory, ranks, config.pairs, config.snippet, g) for g in generators]
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = RewardEnsemble(trajectory.observations.shape[-1], config)
    real = trajectory.observations[trajectory.mask]
    model.obs_mean.copy_(real.mean(dim=0))
    model.obs_std.copy_(real.std(dim=0).clamp(min=1e-3))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in tqdm(range(config.steps), desc="reward model", disable=not progress, leave=False):
        batches = [d[torch.randint(len(d), (config.batch_size,), generator=g)] for d, g in zip(draws, generators)]
        episodes = torch.cat([b[:, [0, 2]].flatten() for b in batches]).unique()
        rewards = model.member_rewards(trajectory.take(episodes))
        cumulative = torch.nn.functional.pad(rewards.cumsum(dim=-1), (1, 0))
        position = torch.full((trajectory.num_episodes,), -1, dtype=torch.long)
        position[episodes] = torch.arange(len(episodes))
        loss = 0.0
        for m, b in enumerate(batches):
            worse = _snippet_sums(cumulative[m], position[b[:, 0]], b[:, 1], b[:, 4])
            better = _snippet_sums(cumulative[m], position[b[:, 2]], b[:, 3], b[:, 4])
            # Bradley-Terry: P(better preferred) = softmax over the two summed rewards.
            loss = loss + nn.functional.cross_entropy(torch.stack([worse, better], dim=1), torch.ones(len(b), dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def pair_accuracy(model: RewardEnsemble, trajectory: Trajectory, ranks: torch.Tensor, count: int = 2000, seed: int = 0) -> float:
    """Fraction of random same-task episode pairs of different rank whose predicted returns agree with the ranks."""
    _check_ranks(trajectory, ranks)
    pairs = _episode_pairs(_comparable(trajectory, ranks), ranks, count, torch.Generator().manual_seed(seed))
    predicted = model.predict_returns(trajectory)
    return float((predicted[pairs[:, 1]] > predicted[pairs[:, 0]]).float().mean())


def return_correlation(model: RewardEnsemble, trajectory: Trajectory) -> float:
    """Pearson correlation between predicted and true episode returns."""
    if trajectory.rewards is None:
        raise ValueError("the trajectory is reward-free: there is no true return to correlate with")
    stacked = torch.stack([model.predict_returns(trajectory), trajectory.returns])
    return float(torch.corrcoef(stacked)[0, 1])


def save_reward_model(model: RewardEnsemble, path: str | os.PathLike) -> Path:
    """Write ``model`` to the folder ``path`` (``model.safetensors`` + ``config.json``), atomically."""
    config = {"format_version": FORMAT_VERSION, "obs_dim": model.obs_dim, "config": asdict(model.config)}
    with atomic_path(path, FolderKind("reward model", {"format_version", "obs_dim", "config"})) as tmp:
        tmp.mkdir()
        write_weights(model.state_dict(), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(path)


def load_reward_model(path: str | os.PathLike) -> RewardEnsemble:
    """Read a model written by :func:`save_reward_model`; a damaged or foreign one raises ``ValueError``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved reward model (no config.json)")
    saved = read_json_object(path / "config.json")
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: reward model format {saved.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    check_keys(saved, path / "config.json", ("format_version", "obs_dim", "config"))
    try:
        fields = saved["config"]
        config = RewardModelConfig(**{**fields, "hidden": tuple(fields["hidden"]), "snippet": tuple(fields["snippet"])})
        model = RewardEnsemble(saved["obs_dim"], config)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"{path / 'config.json'} describes no valid reward model: {err!r}") from err
    load_weights(model, path / "model.safetensors")
    return model.eval()


def fit_on_dataset(
    root: str | os.PathLike, heldout_tasks: int = 10, config: RewardModelConfig = RewardModelConfig(), out: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Train on a dataset's ranked episodes, then measure on fresh ranked episodes of held-out tasks.

    The held-out episodes come from the first ``heldout_tasks`` tasks of the suite's ``test``
    split (never in a ``train`` dataset), collected with the dataset's own noise ladder.
    Saves the model to ``out`` (default ``root/reward_model``) and a JSON report beside it.
    """
    from improver.tasks import make_suite

    from .dataset import ImprovementDataset
    from .drex import ranked_family
    from .generate import PRESETS

    data = ImprovementDataset(root)
    settings = data.manifest["config"]
    if settings["split"] != "train":
        raise ValueError(f"{root} holds {settings['split']!r} tasks; train the reward model on a train-split dataset")
    ranked, levels = data.ranked()
    model = train_reward_model(ranked, -levels, config)
    suite = make_suite(settings["suite"], settings["suite_seed"])
    preset = PRESETS[settings["preset"]]
    render = None
    if config.use_frames:
        from improver.tasks import RenderConfig

        render = RenderConfig(**settings["render"])
    held_out = ranked_family(
        suite.expert, suite.first("test", heldout_tasks), preset.ladder, preset.episodes_per_level,
        seed=settings["seed"] + 1, render=render, max_steps=preset.max_steps,
    )
    report = {
        "suite": settings["suite"],
        "train_episodes": ranked.num_episodes,
        "heldout_tasks": heldout_tasks,
        "heldout_episodes": held_out.trajectory.num_episodes,
        "train_pair_accuracy": pair_accuracy(model, ranked, -levels),
        "heldout_pair_accuracy": pair_accuracy(model, held_out.trajectory, held_out.ranks),
        "heldout_return_correlation": return_correlation(model, held_out.trajectory),
        "config": asdict(config),
    }
    out = Path(out) if out is not None else Path(root) / "reward_model"
    save_reward_model(model, out)
    with atomic_path(out.with_name(out.name + "_report.json")) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report
