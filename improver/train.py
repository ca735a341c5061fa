"""One recipe from a suite to a working improver: ``improver train --suite ML1:<family> --out DIR``.

Stages, each resumable (a rerun of the same command continues where a kill stopped it) and each
split over the processes of an ``accelerate launch``:

0. ``DIR/expert_check.json``: the expert succeeds, and a smooth head can follow it (no jumps at
   phase switches), on a few training tasks (:func:`improver.tasks.expert_check.expert_check`).
   A family whose smoothed expert loses success against its raw scripted policy imitates the raw one.
1. ``DIR/data/train`` and ``DIR/data/heldout``: datasets of training and held-out tasks
   (``improver generate``); the held-out one only supplies starting policies and is never trained on.
2. ``DIR/starting/train`` and ``DIR/starting/heldout``: starting policies, the zoo policies with
   recorded success at most ``max_start_success``, one per task.
3. ``DIR/<task inference>/meta-train``: meta-training of the behaviour head and task inference,
   for each way of task inference asked for (``goal-locator``, ``learned``, ``none``).
4. ``DIR/<task inference>/refine``: the on-policy refinement on the loop's own episodes on the
   training tasks (task inference, then the behaviour head, DAgger-style, on the states the loop visits).
5. ``DIR/choose/<task inference>/<settings>``: each improver with each candidate of
   :func:`candidate_settings` runs the improvement loop from the training starting policies; the
   best pair by noise-free success after the last step (then the mean over the steps, then the
   return) becomes ``DIR/improver`` with those ``loop_settings``. Held-out tasks play no part in
   any choice.
6. ``DIR/report``: the final improver with those settings from the held-out and the training
   starting policies, next to the expert; ``DIR/report.md``, ``DIR/report.json`` and
   ``DIR/report.png``. The improver is ``DIR/improver``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from .io import atomic_path  # noqa: E402
from .bench import improver_rows, mean_ci  # noqa: E402
from .loop_settings import LoopSettings  # noqa: E402
from .operator import Improver  # noqa: E402
from .policies import load_policy  # noqa: E402
from .saved_files import read_json_object  # noqa: E402
from .tasks import Task, make_suite, rollout  # noqa: E402
from .task_inference import TASK_INFERENCE_NAMES, TaskInferenceName  # noqa: E402
from .tasks.evaluation import format_table  # noqa: E402
from .tasks.expert_check import raw_is_better  # noqa: E402

SETTINGS = "train_config.json"


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train`. The default budget is the one the shipped improvers were built with
    (40 training tasks; reach-v3 needed 2,500 meta-training steps, push-v3 6,000): on 2 CPU cores
    about 20 min of data, 30-60 min of meta-training, 20 min of refinement, 15 min of choosing and
    20 min of report (``docs/train.md`` has the measured wall times)."""

    suite: str
    """Suite to build an improver for, e.g. ML1:window-open-v3 (or toy:reach2d)."""
    train_tasks: int = 40
    """Training tasks of the dataset: more tasks, better generalisation."""
    heldout_tasks: int = 10
    """Held-out tasks the report measures on (never trained on)."""
    steps: int = 4000
    """Meta-training optimiser steps."""
    preset: Literal["tiny", "demo", "full"] = "demo"
    """Dataset size per task (`improver generate --preset`; tiny is for tests)."""
    task_inference: tuple[Literal[TaskInferenceName, "none"], ...] = TASK_INFERENCE_NAMES
    """How the improver may infer the hidden task from experience (see improver.task_inference): an improver
    is meta-trained and refined for each, and the choice on the training tasks picks one (each costs a
    meta-training, a refinement and a choice)."""
    width: int = 64
    """Network width."""
    lr: float = 1e-3
    """Meta-training learning rate."""
    refine_steps: int = 500
    """Optimiser steps of the refinement's task-inference fit (0 and ``head_steps`` 0: no refinement)."""
    head_steps: int = 1000
    """Optimiser steps of the refinement's behaviour-head fit on the loop's own states."""
    choose_policies: int = 8
    """Training starting policies the loop settings are chosen on (one per training task)."""
    report_seeds: int = 3
    """Seeds of each held-out starting policy in the report."""
    loop_steps: int = 3
    """Improvement steps of the loop in the choice and the report."""
    episodes: int = 10
    """Episodes per improvement step."""
    max_start_success: float = 0.3
    """Starting policies are zoo policies with at most this recorded success."""
    seed: int = 0
    """Seed of the data, the weights and every loop."""

    def __post_init__(self) -> None:
        positive = ("train_tasks", "heldout_tasks", "steps", "width", "choose_policies", "report_seeds", "loop_steps", "episodes")
        bad = {name: getattr(self, name) for name in positive if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1)}
        if bad:
            raise ValueError(f"TrainConfig: these must be positive integers: {bad}")
        if not (isinstance(self.refine_steps, int) and isinstance(self.head_steps, int) and min(self.refine_steps, self.head_steps) >= 0):
            raise ValueError(f"TrainConfig: refine_steps and head_steps must be integers of 0 or more; got {self.refine_steps}, {self.head_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be positive; got {self.lr}")
        if not self.task_inference or len(set(self.task_inference)) != len(self.task_inference):
            raise ValueError(f"TrainConfig.task_inference must name one or more distinct ways; got {self.task_inference!r}")
        if not 0.0 <= self.max_start_success < 1.0:
            raise ValueError(f"TrainConfig.max_start_success must be in [0, 1); got {self.max_start_success}")


def candidate_settings(task_scale: float | None) -> dict[str, LoopSettings]:
    """The loop settings :func:`train` chooses from, by name.

    Nothing here is a family's: exploration noise 0.3 (actions lie in ``[-1, 1]``) spreads the
    states the task is inferred from; the task exploration, when the improver infers the task, is
    one and two standard deviations of the training tasks' parameters (``task_scale``, in their units).
    """
    candidates = {
        "parameters": LoopSettings("parameters", exploration=0.3),
        "behaviour": LoopSettings("behaviour", exploration=0.3),
    }
    if task_scale:
        candidates["behaviour+task-exploration"] = LoopSettings("behaviour", 0.3, task_scale, 2 * task_scale)
    return candidates


def train(config: TrainConfig, out: str | os.PathLike, progress: bool = True) -> Improver:
    """Build an improver for ``config.suite`` in ``out`` (see the module docstring) and return it.

    Runs on every process of an ``accelerate launch``; a rerun with the same settings resumes.

    Raises:
        FileExistsError: ``out`` holds files that no training run wrote.
        ValueError: ``out`` holds a training run of other settings.
    """
    from .augment.dataset import ImprovementDataset
    from .augment.generate import GenerateConfig, dataset_suite, generate
    from .demo import export_lesser
    from .meta_train import MetaTrainConfig, build_improver, meta_train
    from .refine import RefineConfig, refine_locator

    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(out)
    _check_out(out, config)
    state.wait_for_everyone()
    if state.is_main_process and not (out / SETTINGS).exists():
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / SETTINGS) as tmp:
            tmp.write_text(json.dumps(asdict(config), indent=2))
    started = time.perf_counter()
    wall: dict[str, float] = {}

    def stage(name: str, began: float) -> None:
        wall[name] = time.perf_counter() - began
        if progress and state.is_main_process:
            print(f"[train] {name} done in {wall[name]:.0f} s")

    t = time.perf_counter()
    checks = _expert_check(config, out / "expert_check.json", state)
    stage("expert check", t)

    t = time.perf_counter()
    raw = tuple(family for family, c in checks.items() if raw_is_better(c["expert"]["success"], c["raw"] and c["raw"]["success"]))
    datasets = {}
    for split, tasks in (("train", config.train_tasks), ("test", config.heldout_tasks)):
        folder = out / "data" / ("train" if split == "train" else "heldout")
        generate(GenerateConfig(config.suite, split, config.preset, config.seed, tasks=tasks, raw_expert_families=raw), folder, progress=progress)
        datasets[split] = ImprovementDataset(folder)
    stage("data", t)

    t = time.perf_counter()
    starting = {}
    for split, name, limit in (("train", "train", config.choose_policies), ("test", "heldout", None)):
        folder = out / "starting" / name
        if state.is_main_process and not folder.exists():
            with atomic_path(folder) as tmp:
                export_lesser(datasets[split], tmp, config.max_start_success, limit=limit, per_task=1)
        starting[name] = folder
    state.wait_for_everyone()
    stage("starting policies", t)

    improvers, choice, candidates = {}, {}, {}
    suite = dataset_suite(datasets["train"].manifest["config"])  # with the expert the data imitates
    train_starts = _starts(starting["train"], suite)
    for inference in config.task_inference:
        t = time.perf_counter()
        folder = out / inference
        improver = build_improver(
            datasets["train"], width=config.width, task_inference=None if inference == "none" else inference, fit_epochs=20, seed=config.seed
        )
        meta = MetaTrainConfig(config.steps, lr=config.lr, distill_weight=0.0, checkpoint_every=250, seed=config.seed)
        improver = meta_train(improver, datasets["train"], meta, folder / "meta-train", progress=progress)
        stage(f"{inference}: meta-training", t)

        t = time.perf_counter()
        scale = _task_scale(improver)
        if scale is not None and (config.refine_steps or config.head_steps):
            if (folder / "refine" / "improver").exists():
                improver = Improver.from_pretrained(folder / "refine" / "improver")
            else:
                refine = RefineConfig(
                    loop_steps=config.loop_steps, episodes=config.episodes, exploration=0.3, task_exploration=scale, wide_task_exploration=2 * scale,
                    max_success=config.max_start_success, steps=config.refine_steps, head_steps=config.head_steps, seed=config.seed,
                )
                improver, _ = refine_locator(improver, datasets["train"], refine, folder / "refine", progress=progress)
            stage(f"{inference}: refinement", t)

        t = time.perf_counter()
        improvers[inference] = improver
        for name, settings in candidate_settings(scale).items():
            candidates[f"{inference}/{name}"] = settings
            choice[f"{inference}/{name}"] = _run_units(improver, settings, train_starts, 1, config, out / "choose" / inference / name, state, progress)
        stage(f"{inference}: choice of loop settings", t)

    chosen = max(choice, key=lambda name: _rank(choice[name]))
    improver = improvers[chosen.split("/")[0]]
    improver.loop_settings = candidates[chosen]
    if state.is_main_process:
        improver.save_pretrained(out / "improver", metadata={"train": asdict(config), "chosen": chosen})
    state.wait_for_everyone()

    t = time.perf_counter()
    heldout = _run_units(improver, candidates[chosen], _starts(starting["heldout"], suite), config.report_seeds, config, out / "report" / "heldout", state, progress)
    stage("report", t)
    if state.is_main_process:
        report = {
            "suite": config.suite, "config": asdict(config), "chosen": chosen, "loop_settings": asdict(candidates[chosen]),
            "expert": {"train": _expert_success(suite, "train", config), "heldout": _expert_success(suite, "test", config)},
            "expert_check": checks,
            "choice": {name: _summary(units) for name, units in choice.items()},
            "train": _summary(choice[chosen]), "heldout": _summary(heldout),
            "wall_s": {**wall, "this_run": time.perf_counter() - started},
        }
        report["verdict"] = verdict(report)
        write_report(report, out)
        print(format_report(report))
    state.wait_for_everyone()
    return improver


def _check_out(out: Path, config: TrainConfig) -> None:
    """Refuse an ``out`` that holds files no training run wrote, or a run of other settings."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a folder for the training run (nothing was changed)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / SETTINGS).is_file():
        raise FileExistsError(f"{out} is not empty and holds no training run (no {SETTINGS}; it holds {sorted(p.name for p in out.iterdir())[:8]}): choose another --out")
    recorded, wanted = read_json_object(out / SETTINGS), json.loads(json.dumps(asdict(config)))  # tuples as JSON lists
    changed = sorted(k for k in wanted.keys() | recorded.keys() if recorded.get(k) != wanted.get(k))
    if changed:
        raise ValueError(f"{out} holds a training run of other settings ({', '.join(changed)}); rerun with the same ones to resume, or choose another --out")


def _expert_check(config: TrainConfig, path: Path, state: PartialState) -> dict[str, Any]:
    """Check on training tasks that the suite's expert succeeds and that a smooth head can follow it
    (:func:`improver.tasks.expert_check.expert_check`); printed, and kept in ``path`` for reruns."""
    from .tasks.expert_check import expert_check, format_expert_check

    if state.is_main_process and not path.exists():
        checks = expert_check(make_suite(config.suite), "train", tasks=min(5, config.train_tasks), seed=config.seed)
        print(format_expert_check(checks))
        record = {family: {"expert": c.expert._asdict(), "raw": c.raw._asdict() if c.raw else None, "problem": c.problem} for family, c in checks.items()}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
    state.wait_for_everyone()
    return read_json_object(path)


def _task_scale(improver: Improver) -> float | None:
    """Standard deviation of the training tasks' parameters, in their units (``None``: no task inference)."""
    return float(improver.net.task_inference.task_std.mean()) if improver.config.task_dim else None


def _starts(folder: Path, suite: Any) -> list[tuple[str, torch.nn.Module, Task]]:
    """The starting policies in ``folder`` with the task each record names."""
    starts = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir()):
        policy, record = load_policy(path)
        starts.append((path.name, policy, suite.tasks(record["split"])[record["index"]]))
    return starts


def _run_units(
    improver: Improver, settings: LoopSettings, starts: list, seeds: int, config: TrainConfig, folder: Path, state: PartialState, progress: bool
) -> list[dict[str, Any]]:
    """Run :func:`improver.bench.improver_rows` for every (starting policy, seed) unit, split over the processes; each
    unit's rows are written to ``folder/<policy>-<seed>.json`` and a rerun skips those on disk."""
    units = [(name, policy, task, config.seed + 1000 * s) for name, policy, task in starts for s in range(seeds)]

    def path(name: str, seed: int) -> Path:
        return folder / f"{name}-{seed}.json"

    mine = [u for u in units[state.process_index :: state.num_processes] if not path(u[0], u[3]).exists()]
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    for name, policy, task, seed in tqdm(mine, desc=f"{folder.parent.name}/{folder.name}", unit="unit", disable=not progress):
        rows = improver_rows(improver, policy, [task], settings, config.loop_steps, config.episodes, seed)
        with atomic_path(path(name, seed)) as tmp:
            tmp.write_text(json.dumps({"policy": name, "seed": seed, "task": task.index, "rows": rows}))
    state.wait_for_everyone()
    return [read_json_object(path(name, seed)) for name, _, _, seed in units]


def _rank(units: list[dict[str, Any]]) -> tuple[float, float, float]:
    """How a candidate's units rank: mean success after the last step, then over steps 1 and on, then the last return."""
    rows = _summary(units)["rows"]
    return rows[-1]["success"], sum(r["success"] for r in rows[1:]) / max(1, len(rows) - 1), rows[-1]["mean_return"]


def _summary(units: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step: mean success and return over the units, the success's 95% t-interval half-width, and the unit count."""
    rows = []
    for k in range(len(units[0]["rows"])):
        success, half = mean_ci([u["rows"][k]["success"] for u in units])
        rows.append({"step": k, "success": success, "ci95": half, "mean_return": sum(u["rows"][k]["mean_return"] for u in units) / len(units)})
    return {"units": len(units), "rows": rows, "per_unit": [{"policy": u["policy"], "seed": u["seed"], "success": [r["success"] for r in u["rows"]]} for u in units]}


def _expert_success(suite: Any, split: str, config: TrainConfig) -> float:
    """The suite's expert's success on the first tasks of ``split`` the run uses (one episode each)."""
    tasks = suite.first(split, config.train_tasks if split == "train" else config.heldout_tasks)
    return float(rollout(suite.expert, tasks, 1, seed=config.seed, progress=False).success.float().mean())


def verdict(report: dict[str, Any]) -> str:
    """``"worked"`` if held-out success after the last step is at least half the expert's and above
    the starting policies'; ``"failed"`` otherwise."""
    rows, expert = report["heldout"]["rows"], report["expert"]["heldout"]
    return "worked" if rows[-1]["success"] >= 0.5 * expert and rows[-1]["success"] > rows[0]["success"] else "failed"


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown: the verdict, the success table, the choice of loop settings."""
    steps = len(report["heldout"]["rows"]) - 1
    table = []
    for name, key in (("held-out tasks", "heldout"), ("training tasks", "train")):
        part = report[key]
        cells = [f"{r['success']:.2f}" + (f" ± {r['ci95']:.2f}" if r["ci95"] is not None else "") for r in part["rows"]]
        table.append({"tasks": name, "expert": report["expert"][key], "units": part["units"], **{f"step {k}": c for k, c in enumerate(cells)}})
    choice = [{"settings": name, **{f"step {r['step']}": r["success"] for r in s["rows"]}, "chosen": name == report["chosen"]} for name, s in report["choice"].items()]
    word = "WORKED" if report["verdict"] == "worked" else "FAILED"
    problems = [f"- expert check, {family}: {c['problem']}" for family, c in report["expert_check"].items() if c["problem"]]
    lines = [
        f"# Training report: {report['suite']}",
        "",
        f"**Training {word}**: held-out success after step {steps} is {report['heldout']['rows'][-1]['success']:.2f} "
        f"(expert {report['expert']['heldout']:.2f}, starting policies {report['heldout']['rows'][0]['success']:.2f}).",
        *(["", *problems] if problems else []),
        "",
        f"Noise-free success of the policy after each improvement step ({report['config']['episodes']} episodes per step), mean and 95% interval over "
        f"(starting policy, seed) units; step 0 is the starting policy. Loop settings: {report['loop_settings']} ({report['chosen']!r}, "
        "chosen on the training tasks).",
        "",
        format_table(table),
        "",
        "Choice of the loop settings (training starting policies, one seed):",
        "",
        format_table(choice),
        "",
        "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["wall_s"].items()),
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write ``out/report.json``, ``out/report.md`` and ``out/report.png`` (success per step)."""
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(format_report(report))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label, color in (("heldout", "held-out tasks", "C0"), ("train", "training tasks", "C1")):
        rows = report[key]["rows"]
        steps = [r["step"] for r in rows]
        ax.errorbar(steps, [r["success"] for r in rows], yerr=[r["ci95"] or 0.0 for r in rows], label=label, color=color, marker="o", capsize=3)
        ax.axhline(report["expert"][key], color=color, linestyle="--", linewidth=1, label=f"expert ({label})")
    ax.set(xlabel="improvement step", ylabel="success (noise-free)", ylim=(-0.05, 1.05), title=f"{report['suite']}: {report['verdict']}")
    ax.set_xticks(steps)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "report.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
