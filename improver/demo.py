"""The README's main job. Until the improver is trained, it shows the task layer end to end:
the scripted experts on held-out tasks, a success table, and a video of one episode."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .io import atomic_path
from .tasks import make_suite
from .tasks.evaluation import evaluate


def run_demo(suite_name: str, episodes: int, out: Path, seed: int) -> dict:
    """Evaluate ``suite_name``'s scripted expert on held-out tasks; write ``out/expert_heldout.mp4`` and ``out/summary.json``."""
    start = time.perf_counter()
    suite = make_suite(suite_name, seed)
    video = out / "expert_heldout.mp4"
    trajectory, rows = evaluate(suite.expert, suite, "test", episodes, seed, video=video)
    summary = {
        "suite": suite_name,
        "split": "test",
        "policy": "scripted expert",
        "rows": rows,
        "env_steps": int(trajectory.lengths.sum()),
        "wall_time_s": time.perf_counter() - start,
        "video": str(video),
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['wall_time_s']:.1f} s; wrote {out / 'summary.json'}")
    return summary
