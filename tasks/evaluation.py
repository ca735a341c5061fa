"""Meta-World's evaluation protocol over a batch of episodes, and a plain-text table of it."""

from __future__ import annotations

import os
from typing import Any, Sequence

from improver.types import Policy, Trajectory

from .rendering import RenderConfig
from .rollout import rollout
from .suite import Suite, Task
from .video import episode_frames, write_video


def summarize(trajectory: Trajectory) -> list[dict[str, Any]]:
    """Per task family and overall: episodes, success rate, mean return, mean episode length.

    An episode succeeds if its success flag is set at any step.
    """
    families = list(dict.fromkeys(info.family for info in trajectory.tasks))
    success, lengths = trajectory.success.float(), trajectory.lengths.float()
    returns = trajectory.returns if trajectory.rewards is not None else None
    rows = []
    for family in [*families, "all"] if len(families) > 1 else families:
        idx = [i for i, info in enumerate(trajectory.tasks) if family in ("all", info.family)]
        rows.append(
            {
                "family": family,
                "episodes": len(idx),
                "success": float(success[idx].mean()),
                "mean_return": None if returns is None else float(returns[idx].mean()),
                "mean_length": float(lengths[idx].mean()),
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Align ``rows`` (dicts with the same keys) as a Markdown table; floats get 3 decimals."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    cells = [[f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(keys), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def spread(tasks: Sequence[Task], episodes: int) -> list[Task]:
    """``episodes`` tasks taken round-robin from ``tasks`` (distinct tasks while there are enough)."""
    if episodes <= 0:
        raise ValueError(f"episodes must be positive; got {episodes}")
    return [tasks[i % len(tasks)] for i in range(episodes)]


def evaluate(
    policy: Policy,
    suite: Suite,
    split: str = "test",
    episodes: int = 20,
    seed: int = 0,
    stop_on_success: bool = False,
    video: str | os.PathLike | None = None,
    video_config: RenderConfig = RenderConfig(every=2, size=128),
) -> tuple[Trajectory, list[dict[str, Any]]]:
    """Run ``episodes`` episodes spread over ``split``, print the success table, optionally write a video.

    The video replays the first episode (same task, same seed) with rendering on.

    Returns:
        The episodes and the rows of the table (see :func:`summarize`).
    """
    tasks = spread(suite.tasks(split), episodes)
    trajectory = rollout(policy, tasks, 1, seed=seed, stop_on_success=stop_on_success)
    rows = summarize(trajectory)
    print(f"{suite.name} [{split}] {episodes} episodes, seed {seed}")
    print(format_table(rows))
    if video is not None:
        filmed = rollout(policy, tasks[0], 1, seed=seed, stop_on_success=stop_on_success, render=video_config)
        print(f"wrote {write_video(video, episode_frames(filmed), fps=max(1, 40 // video_config.every))}")
    return trajectory, rows
