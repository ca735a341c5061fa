"""Time and peak memory of one ``Improver.step`` against the number of episodes (``improver bench step``).

Each measurement runs in a fresh Python process, so its peak resident memory is that step's alone
(plus the interpreter, torch and the experience, reported as ``before_mb``).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..loop_settings import Mode
from ..operator import Improver
from ..policies import MLPPolicy
from ..types import TaskInfo, Trajectory

def random_experience(improver: Improver, episodes: int, steps: int = 500, seed: int = 0) -> Trajectory:
    """``episodes`` full episodes of ``steps`` steps with random states spread like the improver's training data.

    States are Gaussian with the improver's observation statistics, actions uniform in ``[-1, 1]``
    and rewards uniform in ``[0, reward_scale]``: the shapes and scales of real experience (e.g.
    push-v3's 39-d observations and 4-d actions) at no simulation cost.
    """
    net = improver.net
    generator = torch.Generator().manual_seed(seed)
    shape = (episodes, steps)
    unknown = (0.0,) * improver.config.task_dim  # task parameters: a step never reads them
    return Trajectory(
        observations=net.obs_mean + net.obs_std * torch.randn(*shape, improver.config.obs_dim, generator=generator),
        actions=torch.rand(*shape, improver.config.act_dim, generator=generator) * 2 - 1,
        rewards=torch.rand(*shape, generator=generator) * net.reward_scale,
        successes=torch.zeros(shape, dtype=torch.bool),
        mask=torch.ones(shape, dtype=torch.bool),
        tasks=tuple(TaskInfo("random", "random", "test", 0, 0, i, unknown, "random") for i in range(episodes)),
    )


def _peak_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_step(improver_path: Path, episodes: int, mode: Mode, steps: int = 500, chunk_tokens: int | None = None) -> dict[str, Any]:
    """Run one ``step`` in this process and return its seconds and this process's peak memory (MB).

    Args:
        improver_path: Folder of a trained improver.
        episodes: Episodes of experience.
        mode: ``step``'s mode.
        steps: Steps per episode.
        chunk_tokens: The encoder's chunk size (``None``: the network's default; a huge value
            attends over all episodes as one sequence, as the encoder did before chunking).
    """
    improver = Improver.from_pretrained(improver_path)
    if chunk_tokens is not None:
        improver.net.chunk_tokens = chunk_tokens
    experience = random_experience(improver, episodes, steps)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        policy = MLPPolicy(improver.config.obs_dim, improver.config.act_dim)
    before = _peak_mb()
    start = time.perf_counter()
    improved = improver.step(policy, experience, mode=mode)
    seconds = time.perf_counter() - start
    row = {"episodes": episodes, "steps": steps, "mode": mode, "chunk_tokens": improver.net.chunk_tokens, "seconds": seconds,
           "peak_mb": _peak_mb(), "before_mb": before}
    if mode == "behaviour":
        row["z"] = improved.z.tolist()
    return row


def bench_step(
    improver_path: Path, episodes: Sequence[int], modes: Sequence[Mode], steps: int = 500, chunk_tokens: int | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """:func:`measure_step` for every size and mode, each in a fresh process; prints a row as each ends."""
    rows = []
    print(f"{'episodes':>8} {'mode':>10} {'seconds':>8} {'peak MB':>8} {'before MB':>9}", flush=True)
    for count in episodes:
        for mode in modes:
            args = [str(improver_path), str(count), mode, str(steps), str(chunk_tokens or 0), str(threads or 0)]
            done = subprocess.run([sys.executable, "-m", "improver.bench.step", *args], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"the step measurement for {count} episodes ({mode}) failed:\n{done.stderr[-2000:]}")
            row = json.loads(done.stdout.splitlines()[-1])
            print(f"{count:>8} {mode:>10} {row['seconds']:>8.1f} {row['peak_mb']:>8.0f} {row['before_mb']:>9.0f}", flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":  # one measurement, in the fresh process bench_step starts
    path, count, mode, steps, chunk, threads = sys.argv[1:]
    if int(threads):
        torch.set_num_threads(int(threads))
    print(json.dumps(measure_step(Path(path), int(count), mode, int(steps), int(chunk) or None)))
