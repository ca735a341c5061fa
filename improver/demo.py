"""The README's main job: a shipped improver improves lesser policies on held-out tasks.

A pretrained folder holds the improver (``improver/``, from ``save_pretrained``) and the lesser
policies it starts from (``lesser/<name>/``, from ``save_policy``, each record naming its
held-out task); ``scripts/train_pretrained.sh`` builds one with the project's own commands.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from .io import atomic_path  # noqa: E402
from .loop import Mode, improve, pooled  # noqa: E402
from .operator import Improver  # noqa: E402
from .policies import load_policy, save_policy  # noqa: E402
from .tasks import RenderConfig, make_suite, rollout  # noqa: E402
from .tasks.evaluation import format_table  # noqa: E402
from .tasks.video import episode_frames, write_video  # noqa: E402

VIDEO = RenderConfig(every=4, size=128)


def export_lesser(
    dataset: Any, out: Path, max_success: float = 0.3, limit: int | None = None, per_task: int | None = None
) -> list[Path]:
    """Save the lesser policies of a held-out dataset whose success is at most ``max_success``
    (at most ``limit`` in all and ``per_task`` per held-out task, in the dataset's order).

    Each is written to ``out/<NN>`` with a record naming its suite, split, task and seed.
    """
    saved, taken = [], Counter()
    for i in range(len(dataset)):
        example = dataset.example(i)
        info = example.lesser.tasks[0]
        if example.record["success"] > max_success or (per_task is not None and taken[info.index] >= per_task):
            continue
        taken[info.index] += 1
        record = {"suite": info.suite, "suite_seed": info.suite_seed, "split": info.split, "index": info.index, "zoo": example.record}
        saved.append(save_policy(example.policy, out / f"{len(saved):02d}", record=record))
        if limit is not None and len(saved) == limit:
            break
    if not saved:
        raise ValueError(f"no lesser policy in the dataset has success <= {max_success}")
    return saved


def run_demo(
    pretrained: Path, out: Path, steps: int = 3, episodes: int = 10, mode: Mode | None = None, seed: int = 0, video: bool = True,
    memory: int | None = None, exploration: float | None = None, task_exploration: float | None = None,
    wide_task_exploration: float | None = None,
) -> dict[str, Any]:
    """Improve every lesser policy of ``pretrained`` for ``steps`` steps of ``episodes`` episodes,
    each step watching the episodes of the last ``memory`` steps, collected with ``exploration``
    noise and, in behaviour mode, ``task_exploration`` offsets of the aim (``wide_task_exploration``
    after a step whose episodes all failed; see :func:`improver.loop.improvement_loop`).
    The loop settings left ``None`` are the improver's (its ``loop_settings``).

    Prints the per-step table (averaged over the policies) and writes ``out/summary.json``,
    ``out/success_vs_step.png`` and, with ``video``, ``out/before.mp4`` and ``out/after.mp4`` (the
    first policy on its task before and after).
    """
    start = time.perf_counter()
    folders = sorted(p for p in (pretrained / "lesser").iterdir() if p.is_dir()) if (pretrained / "lesser").is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{pretrained / 'lesser'} holds no lesser policies (see scripts/train_pretrained.sh)")
    improver = Improver.from_pretrained(pretrained / "improver")
    settings = improver.loop_settings.overridden(mode, exploration, task_exploration, wide_task_exploration, memory)
    runs = []
    for folder in tqdm(folders, desc=f"improve ({settings.mode})", unit="policy"):
        policy, record = load_policy(folder)
        task = make_suite(record["suite"], record["suite_seed"]).tasks(record["split"])[record["index"]]
        final, rows = improve(improver, policy, task, steps, episodes, seed, **asdict(settings))
        runs.append({"policy": folder.name, "task": f"{task.suite} [{task.split}] #{task.index}", "rows": rows, "env": task, "first": policy, "final": final})
    table = pooled([r["rows"] for r in runs])
    print(f"{len(runs)} lesser policies on held-out tasks, {episodes} episodes per step, {settings}")
    print(format_table(table))
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, table, out / "success_vs_step.png")
    if video:
        first = runs[0]
        for name, policy in (("before", first["first"]), ("after", first["final"])):
            filmed = rollout(policy, first["env"], 1, seed=seed, render=VIDEO, progress=False)
            write_video(out / f"{name}.mp4", episode_frames(filmed), fps=10)
    summary = {
        "pretrained": str(pretrained),
        "steps": steps,
        "episodes_per_step": episodes,
        **asdict(settings),
        "seed": seed,
        "table": table,
        "policies": [{k: r[k] for k in ("policy", "task", "rows")} for r in runs],
        "wall_time_s": time.perf_counter() - start,
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['wall_time_s']:.1f} s; wrote {out}/summary.json, success_vs_step.png" + (", before.mp4, after.mp4" if video else ""))
    return summary


def _plot(runs: list[dict[str, Any]], table: list[dict[str, Any]], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in table]
    for axis, key, label in ((axes[0], "success", "success rate"), (axes[1], "mean_return", "mean return")):
        for run in runs:
            axis.plot(steps, [r[key] for r in run["rows"]], color="0.75", lw=1)
        axis.plot(steps, [r[key] for r in table], "o-", color="C0", lw=2, label="mean over policies")
        axis.set(xlabel="improvement step", ylabel=label, xticks=steps)
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend(loc="upper left")
    figure.suptitle("held-out tasks: one grey line per lesser policy")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
