"""The ``improver`` command: ``train``, ``demo``, ``rollout``, ``generate``, ``reward-model``, ``meta-train``, ``refine-locator``, ``improve``, ``metaworld-eval``,
``starting-policies`` and ``bench``.

Each concept is one config dataclass, declared once and nested into the commands that need it
(tyro's ``OmitArgPrefixes`` keeps the flags short): the loop settings (:class:`~improver.loop_settings.LoopOverrides`,
whose unset fields are the improver's own), the loop's length (:class:`LoopLength`), the network
(:class:`Network`), meta-training (:class:`~improver.meta_train.MetaTrainConfig`), refinement
(:class:`~improver.refine.RefineConfig`), the whole recipe (:class:`~improver.train.TrainConfig`), a dataset
(:class:`~improver.augment.generate.GenerateConfig`) and the ranking reward (:class:`~improver.augment.ranking_reward.RewardModelConfig`).

``improver --help`` answers without importing torch: all but the first three live in modules that import
it, so they are bound here (:func:`bind_nested_configs`) only once a command has been chosen.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import tyro

from .io import atomic_path
from .loop_settings import LoopOverrides

if TYPE_CHECKING:
    from .augment.generate import GenerateConfig
    from .augment.ranking_reward import RewardModelConfig
    from .meta_train import MetaTrainConfig
    from .refine import RefineConfig
    from .task_inference import TaskInferenceName
    from .train import TrainConfig

Loop = Annotated[LoopOverrides, tyro.conf.OmitArgPrefixes]
"""Nested without a prefix, so the flags are --mode, --exploration, ..."""


def bind_nested_configs() -> None:
    """Import the config classes the commands nest into this module, where tyro resolves the commands' annotations.

    They live next to code that imports torch; binding them only when a command runs keeps
    ``improver --help`` light.
    """
    global GenerateConfig, MetaTrainConfig, RefineConfig, RewardModelConfig, TaskInferenceName, TrainConfig
    from .augment.generate import GenerateConfig
    from .augment.ranking_reward import RewardModelConfig
    from .meta_train import MetaTrainConfig
    from .refine import RefineConfig
    from .task_inference import TaskInferenceName
    from .train import TrainConfig


@dataclass(frozen=True)
class LoopLength:
    """How long the improvement loop runs."""

    steps: int = 3
    """Improvement steps."""
    episodes: int = 10
    """Episodes collected per step (and per policy)."""
    seed: int = 0
    """Seed of the episodes."""


@dataclass(frozen=True)
class Network:
    """The improver meta-training builds (:func:`improver.meta_train.build_improver`); its observation,
    action and task sizes come from the dataset."""

    width: int = 64
    """Network width."""
    token_stride: int = 10
    """One experience token every this many steps (1 for short episodes)."""
    frames: bool = False
    """Watch frames too (the dataset must have them)."""
    task_inference: Literal[TaskInferenceName, "none"] = "goal-locator"
    """How the improver infers the hidden task parameters from the experience, supervised with those in the
    dataset's task records (see improver.task_inference); none: no task inference."""
    distill_steps: int = 20
    """Distillation steps of parameters mode (their sizes are meta-learned)."""
    fit_epochs: int | None = None
    """Parameters mode fits the policy to the head's actions with Adam for this many epochs
    instead of the meta-learned steps (default: 20 with --distill-weight 0, whose steps stay untrained; else 0)."""


@dataclass
class Demo:
    """Improve lesser policies on held-out tasks with the shipped improver; print a table per step,
    write a plot of success vs. step and before/after videos."""

    pretrained: Path = Path("pretrained/reach-v3")
    """Folder with improver/ and lesser/ (see scripts/train_pretrained.sh)."""
    out: Path = Path("demo_out")
    """Folder for the summary JSON, the plot and the videos."""
    video: bool = True
    """Write before/after videos of the first policy."""
    length: Annotated[LoopLength, tyro.conf.OmitArgPrefixes] = LoopLength()
    loop: Loop = LoopOverrides()

    def run(self) -> None:
        from .demo import run_demo

        run_demo(
            self.pretrained, self.out, self.length.steps, self.length.episodes, seed=self.length.seed, video=self.video, **asdict(self.loop)
        )


@dataclass
class Rollout:
    """Roll a policy out on a suite's tasks and print Meta-World's success table."""

    suite: str = "ML1:push-v3"
    """Suite name: ML1:<task>, ML10, ML45, MT10, MT50 or toy:reach2d."""
    split: Literal["train", "test"] = "test"
    """Which split's tasks to run on (held-out tasks are `test`)."""
    policy: str = "expert"
    """`expert` for the suite's scripted expert, or the folder of a saved policy."""
    episodes: int = 20
    """Episodes in all, spread round-robin over the split's tasks."""
    seed: int = 0
    """Seed of the episodes."""
    suite_seed: int = 0
    """Seed the suite's task parameters are drawn with."""
    stop_on_success: bool = False
    """End each episode at its first success."""
    video: Path | None = None
    """Write the first episode as a video (.mp4 or .gif)."""
    json_out: Path | None = None
    """Also write the table as JSON."""

    def run(self) -> None:
        from .tasks import make_suite
        from .tasks.evaluation import evaluate

        suite = make_suite(self.suite, self.suite_seed)
        if self.policy == "expert":
            policy = suite.expert
        else:
            from .policies import load_policy

            policy, _ = load_policy(self.policy)
        _, rows = evaluate(policy, suite, self.split, self.episodes, self.seed, self.stop_on_success, self.video)
        if self.json_out:
            _write_json(self.json_out, {"suite": self.suite, "split": self.split, "policy": self.policy, "rows": rows})


@dataclass
class Generate:
    """Build a meta-training dataset: D-REX ranked families, a policy zoo and expert targets."""

    out: Path
    """Dataset folder (rerun with the same settings to resume)."""
    dataset: Annotated[GenerateConfig, tyro.conf.OmitArgPrefixes]

    def run(self) -> None:
        from .augment.generate import generate

        generate(self.dataset, self.out)


@dataclass
class RewardModel:
    """Train the ranking reward model on a dataset; report pair accuracy and return correlation on held-out tasks."""

    data: Path
    """A train-split dataset made by `improver generate`."""
    out: Path | None = None
    """Where to save the model (default: DATA/reward_model)."""
    heldout_tasks: int = 10
    """Held-out (test-split) tasks to measure on."""
    # a lambda: the config class is bound only once a command runs (bind_nested_configs)
    model: Annotated[RewardModelConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=lambda: RewardModelConfig())
    """--use-frames needs a dataset generated with --frames."""

    def run(self) -> None:
        from .augment.ranking_reward import fit_on_dataset

        report = fit_on_dataset(self.data, self.heldout_tasks, self.model, self.out)
        print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


@dataclass
class MetaTrain:
    """Meta-train an improver on a dataset made by `improver generate` (a rerun into the same OUT resumes
    from OUT/checkpoints; it must have the run's settings, except --steps, which may change down to the checkpoint's step)."""

    data: Path
    """Dataset folder."""
    out: Path
    """Run folder: checkpoints, TensorBoard logs, and the trained improver in OUT/improver."""
    network: Annotated[Network, tyro.conf.OmitArgPrefixes] = Network()
    meta_training: Annotated[MetaTrainConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=lambda: MetaTrainConfig(distill_weight=0.0))
    """--distill-weight defaults to 0 here, the recipe of `improver train` and of the shipped improvers (the behaviour
    head only, much faster; parameters mode then fits the policy to the head's actions with Adam, --fit-epochs);
    --seed also seeds the initial weights."""
    validation: Path | None = None
    """A held-out dataset (`improver generate --split test`) to measure success after a step on."""
    reward_model: Path | None = None
    """Meta-train reward-free: this ranking reward model (`improver reward-model`) scores the
    experience in place of the environment's rewards, in training and at every step after."""

    def run(self) -> None:
        from .augment.dataset import ImprovementDataset
        from .augment.ranking_reward import load_reward_model
        from .meta_train import build_improver, meta_train

        network, config = self.network, self.meta_training
        dataset = ImprovementDataset(self.data)
        improver = build_improver(
            dataset, width=network.width, token_stride=network.token_stride, frames=network.frames,
            task_inference=None if network.task_inference == "none" else network.task_inference, distill_steps=network.distill_steps,
            fit_epochs=network.fit_epochs if network.fit_epochs is not None else (20 if config.distill_weight == 0 else 0),
            reward_free=self.reward_model is not None, seed=config.seed,
        )
        if self.reward_model is not None:
            improver.reward_model = load_reward_model(self.reward_model).requires_grad_(False)
        validation = ImprovementDataset(self.validation) if self.validation else None
        meta_train(improver, dataset, config, self.out, validation=validation)
        print(f"wrote {self.out / 'improver'}")


@dataclass
class RefineLocator:
    """Train an improver's task inference (and, with --head-steps, its behaviour head, DAgger-style) on the episodes
    its own behaviour loop collects on the training tasks (resumes from OUT/episodes). Run it after
    `improver meta-train`; repeat it on its output for another round."""

    improver: Path
    """A meta-trained improver that infers the task."""
    data: Path
    """The training dataset it was meta-trained on (never a held-out one)."""
    out: Path
    """Run folder: the collected episodes in OUT/episodes, the refined improver in OUT/improver."""
    config: Annotated[RefineConfig, tyro.conf.OmitArgPrefixes]

    def run(self) -> None:
        from .augment.dataset import ImprovementDataset
        from .operator import Improver
        from .refine import refine_locator
        from .saved_files import read_json_object

        improver = Improver.from_pretrained(self.improver)
        source = {"source": str(self.improver), "source_metadata": read_json_object(self.improver / "config.json").get("metadata", {})}
        _, scores = refine_locator(improver, ImprovementDataset(self.data), self.config, self.out, metadata=source)
        print(f"task inference error on the {scores['experiences']} collected experiences (training tasks): {scores['error_before']:.4f} -> {scores['error_after']:.4f}")
        if "head_mse_before" in scores:
            print(f"head error (mean squared, against the expert) on their {scores['head_states']} states after step 0: {scores['head_mse_before']:.4f} -> {scores['head_mse_after']:.4f}")
        if "aim_offset" in scores:
            print(f"aim offset {scores['aim_offset']}: mean noise-free return from the last loop contexts {scores['aim_return_before']:.1f} -> {scores['aim_return_after']:.1f}")
        print(f"wrote {self.out / 'improver'}")


@dataclass
class Improve:
    """Improve a saved policy with a trained improver: collect episodes, step, repeat; print a table."""

    policy: Path
    """Folder of a saved policy (improver.policies.save_policy)."""
    improver: Path
    """Folder of a trained improver (save_pretrained; e.g. RUN/improver)."""
    suite: str | None = None
    """Suite whose tasks the policy is improved on (default: the one the policy's record names)."""
    split: Literal["train", "test"] | None = None
    """Split of the tasks, held-out tasks are `test` (default: the record's, else `test`)."""
    task_index: int | None = None
    """One task of the split (default: the record's task if suite and split are the record's, else episodes spread over the whole split)."""
    length: Annotated[LoopLength, tyro.conf.OmitArgPrefixes] = LoopLength()
    loop: Loop = LoopOverrides()
    out: Path | None = None
    """Save the improved policy here (parameters mode)."""

    def run(self) -> None:
        from .loop import improve
        from .operator import Improver
        from .policies import load_policy, save_policy
        from .tasks import make_suite
        from .tasks.evaluation import format_table

        improver = Improver.from_pretrained(self.improver)
        settings = self.loop.applied(improver.loop_settings)
        if self.out is not None and settings.mode != "parameters":
            raise ValueError("--out saves the improved policy's own parameters, which only --mode parameters makes; drop --out or use --mode parameters")
        policy, record = load_policy(self.policy)
        # the record's task holds only when the suite is the record's own
        named = record if self.suite is None or self.suite == record.get("suite") else {}
        suite_name = self.suite or named.get("suite")
        if suite_name is None:
            raise ValueError(f"{self.policy}: its record names no suite; give --suite (and --split, --task-index) to say where to improve it")
        suite = make_suite(suite_name, named.get("suite_seed", 0))
        split = self.split or named.get("split", "test")
        tasks = suite.tasks(split)
        index = self.task_index
        if index is None and split == named.get("split"):
            index = named.get("index")
        if index is not None:
            if not 0 <= index < len(tasks):
                raise ValueError(f"--task-index {index} is out of range: {suite_name} has {len(tasks)} {split} tasks (0 to {len(tasks) - 1})")
            tasks = [tasks[index]]
        where = f"{suite_name} [{split}]" + (f" #{index}" if index is not None else f", {len(tasks)} tasks")
        print(f"improving {self.policy} on {where}; loop settings: {settings}")
        length = self.length
        improved, rows = improve(improver, policy, tasks, length.steps, length.episodes, length.seed, **asdict(settings))
        print(format_table(rows))
        if self.out is not None:
            save_policy(improved, self.out, record={**record, "improved_steps": length.steps, "rows": rows})
            print(f"wrote {self.out}")


@dataclass
class StartingPolicies:
    """Save the lesser policies of a held-out dataset as starting policies (for `improver improve`, `demo` and
    `bench improve`): each in OUT/<NN>, with a record naming its suite, split, task and seed."""

    data: Path
    """A held-out dataset (`improver generate --split test`)."""
    out: Path
    """Folder for the policies (one subfolder each)."""
    max_success: float = 0.3
    """Keep only policies whose recorded success on their task is at most this."""
    per_task: int | None = None
    """At most this many per held-out task (default: all that qualify)."""
    limit: int | None = None
    """At most this many in all."""

    def run(self) -> None:
        from .augment.dataset import ImprovementDataset
        from .demo import export_lesser

        saved = export_lesser(ImprovementDataset(self.data), self.out, self.max_success, self.limit, self.per_task)
        print(f"wrote {len(saved)} starting policies to {self.out}")


@dataclass
class BenchRollout:
    """Steps/s of a bare Meta-World loop vs. the rollout collector, and 64x64 render rates."""

    out: Path = Path("bench/rollout.json")
    """Where to write the figures as JSON."""
    family: str = "push-v3"
    """Meta-World task family to measure on."""
    episodes: int = 4
    """Episodes (500 steps each) per collector measurement."""
    frames: int = 60
    """Frames per render measurement."""

    def run(self) -> None:
        from .tasks.bench import bench_rollout

        result = bench_rollout(self.family, self.episodes, self.frames)
        print(json.dumps(result, indent=2))
        _write_json(self.out, result)


@dataclass
class BenchImprove:
    """Held-out benchmark: the improver (both modes) vs. PPO, MAML and filtered BC from the same starting
    policies on the same env-step budget; writes OUT/results.json, OUT/results.md and two plots."""

    suite: str = "ML1:reach-v3"
    """Suite whose held-out (test) tasks are benchmarked on: ML1:<task> or toy:reach2d."""
    improver: Path = Path("pretrained/reach-v3/improver")
    """Folder of a trained improver (save_pretrained)."""
    policies: Path = Path("pretrained/reach-v3/lesser")
    """Folder of saved starting policies (one subfolder each, records naming their held-out task)."""
    data: Path | None = None
    """Train dataset (`improver generate --split train`) the MAML baseline is meta-trained on; without it MAML is skipped."""
    maml_update: Path | None = None
    """Use the MAML update an earlier run saved (OUT/maml_update) instead of meta-training one on --data."""
    out: Path = Path("bench/improve")
    """Output folder. If it holds results of the same settings, the run resumes (more --seeds or --max-policies add units)."""
    preset: Literal["tiny", "small", "full"] = "small"
    """Size: tiny (the CI test), small, full; the options below override it."""
    steps: int | None = None
    """Improvement steps."""
    episodes: int | None = None
    """Episodes per improvement step (the env-step budget per step)."""
    seeds: int | None = None
    """Seeds per starting policy."""
    ppo_multipliers: tuple[int, ...] | None = None
    """PPO's longer run, in multiples of the improver's whole budget (e.g. 1 10 100): PPO runs to the
    largest and is scored at 1, 2, 5, 10, 20, 50, ... times that budget up to it."""
    max_policies: int | None = None
    """Use only the first N starting policies."""
    contenders: tuple[Literal["improver-behaviour", "improver-parameters", "ppo", "maml", "maml-l2l", "metasgd-l2l", "bc"], ...] = (
        "improver-behaviour", "improver-parameters", "ppo", "maml", "bc",
    )
    """Which contenders to run."""
    loop: Loop = LoopOverrides()
    """The improver contenders' loop settings (default: the improver's); --mode is the contenders' choice, and
    --exploration sets the noise every learning contender collects with (default: the protocol's 0.3)."""
    threads: int | None = None
    """torch threads (default: torch's own choice); 1 on a shared machine."""

    def run(self) -> None:
        import torch

        from .bench import BenchConfig, run_benchmark, summary_lines

        if self.loop.mode is not None:
            raise ValueError("bench improve runs each improver contender in its own mode: drop --mode and choose with --contenders")
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        noise = {} if self.loop.exploration is None else {"noise": self.loop.exploration}
        config = BenchConfig(
            suite=self.suite, improver=self.improver, policies=self.policies, data=self.data, preset=self.preset, steps=self.steps,
            episodes=self.episodes, seeds=self.seeds, ppo_multipliers=self.ppo_multipliers, max_policies=self.max_policies,
            contenders=tuple(self.contenders), maml_update=self.maml_update, task_exploration=self.loop.task_exploration,
            wide_task_exploration=self.loop.wide_task_exploration, memory=self.loop.memory, **noise,
        )
        results = run_benchmark(config, self.out)
        print("\n".join(summary_lines(results)))
        print(f"done in {results['wall_time_s']:.0f} s; wrote {self.out}/results.json, results.md, success_vs_step.png, success_vs_env_steps.png")


@dataclass
class BenchStep:
    """Seconds and peak memory of one `Improver.step` on 100, 200 and 400 random episodes of 500 steps
    (both modes, a fresh process each); prints a table and writes JSON."""

    improver: Path = Path("pretrained/push-v3/improver")
    """Folder of a trained improver (its observation and action sizes shape the episodes)."""
    episodes: tuple[int, ...] = (100, 200, 400)
    """Numbers of episodes to measure."""
    modes: tuple[Literal["behaviour", "parameters"], ...] = ("behaviour", "parameters")
    """Modes of `step` to measure."""
    steps: int = 500
    """Steps per episode."""
    chunk_tokens: int | None = None
    """Most tokens the encoder attends over at once (default: the network's); 1000000000 measures the
    encoder as it was before chunking: one sequence over all episodes."""
    threads: int | None = None
    """torch threads (default: torch's own choice); 1 on a shared machine."""
    out: Path = Path("bench/step.json")
    """Where to write the rows as JSON."""

    def run(self) -> None:
        from .bench import bench_step

        rows = bench_step(self.improver, self.episodes, self.modes, self.steps, self.chunk_tokens, self.threads)
        _write_json(self.out, {"improver": str(self.improver), "threads": self.threads, "rows": rows})


def _write_json(path: Path, data: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")


@dataclass
class Train:
    """The whole recipe from a suite to a working improver, with no family-specific flag: data, starting policies,
    meta-training, on-policy refinement, the loop settings chosen on the training tasks, and a report on
    held-out tasks (OUT/report.md, report.json, report.png); the improver is OUT/improver. Each stage resumes
    after a kill (rerun the same command); run it under `accelerate launch --multi_gpu --num_processes 2`."""

    out: Path
    """Run folder (rerun with the same settings to resume)."""
    config: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes]

    def run(self) -> None:
        from .train import train

        from accelerate import PartialState

        train(self.config, self.out)
        if PartialState().is_main_process:
            print(f"wrote {self.out / 'improver'} and {self.out / 'report.md'}")


@dataclass
class MetaworldEval:
    """Meta-World's own meta-learning evaluation (metaworld.evaluation.metalearning_evaluation) of an improver
    adapting a starting policy on held-out ML1 tasks, one task at a time, next to the starting policy left
    unchanged; prints Meta-World's success rate and mean return of both (see improver.integrations.metaworld)."""

    improver: Path
    """Folder of a trained improver (e.g. pretrained/reach-v3/improver)."""
    family: str
    """Meta-World task family whose ML1 test tasks are used, e.g. reach-v3."""
    policy: str = "fresh"
    """Folder of a saved starting policy (e.g. pretrained/reach-v3/lesser/00), or `fresh` (an untrained MLPPolicy)."""
    tasks: int = 10
    """Held-out tasks (the first of the family's test tasks), each one round of the harness."""
    adaptation_steps: int = 3
    """Improvement steps per task."""
    adaptation_episodes: int = 10
    """Episodes collected per improvement step."""
    evaluation_episodes: int = 3
    """Episodes per task that Meta-World evaluates the adapted policy on."""
    seed: int = 0
    """Seed of the tasks (0: the test tasks of the suite ML1:FAMILY with seed 0), the fresh policy and the noise."""
    max_episode_steps: int | None = None
    """Episode length (default: Meta-World's 500)."""
    success_reward: float | None = None
    """A step whose reward reaches this counts as a success for the improver, as the harness passes no success flag
    (default: 10, where Meta-World's v2 rewards mark a solved task)."""
    loop: Loop = LoopOverrides()
    out: Path | None = None
    """Also write the figures as JSON here."""

    def run(self) -> None:
        from .integrations.metaworld import evaluate_in_metaworld
        from .tasks.evaluation import format_table

        result = evaluate_in_metaworld(
            self.improver, self.policy, self.family, self.tasks, self.adaptation_steps, self.adaptation_episodes, self.evaluation_episodes,
            seed=self.seed, max_episode_steps=self.max_episode_steps, **asdict(self.loop),
            **({} if self.success_reward is None else {"success_reward": self.success_reward}),
        )
        print(
            f"Meta-World metalearning_evaluation, ML1 {self.family}: {self.tasks} test tasks, {self.adaptation_steps} adaptation steps "
            f"of {self.adaptation_episodes} episodes, {self.evaluation_episodes} evaluation episodes; loop settings: {result['settings']}"
        )
        print(format_table(result["rows"]))
        if self.out is not None:
            _write_json(self.out, result)


COMMANDS: dict[str, type] = {
    "train": Train, "demo": Demo, "rollout": Rollout, "generate": Generate, "reward-model": RewardModel, "meta-train": MetaTrain,
    "refine-locator": RefineLocator, "improve": Improve, "starting-policies": StartingPolicies, "metaworld-eval": MetaworldEval,
}
BENCHMARKS: dict[str, type] = {"rollout": BenchRollout, "improve": BenchImprove, "step": BenchStep}


def summary(command: type) -> str:
    """The first sentence of a command's docstring, on one line."""
    text = " ".join((command.__doc__ or "").split())
    return re.split(r"(?<!\bvs)\.\s", text)[0].rstrip(".") + "."


def overview() -> str:
    """``improver --help``: every command and benchmark with its summary, built without importing any command's configs."""
    rows = [(name, command) for name, command in COMMANDS.items()] + [(f"bench {name}", command) for name, command in BENCHMARKS.items()]
    width = max(len(name) for name, _ in rows) + 4
    wrap = max(shutil.get_terminal_size().columns, width + 40)
    lines = [
        "usage: improver COMMAND [--help] [OPTIONS]",
        "",
        "policy-improver: a learned policy-improvement operator. `improver COMMAND --help` lists a command's options.",
        "",
        "commands:",
    ]
    for name, command in rows:
        lines += textwrap.wrap(summary(command), wrap, initial_indent=f"  {name:<{width - 2}}", subsequent_indent=" " * width)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``improver`` console script: ``improver COMMAND [OPTIONS]`` or ``improver bench BENCHMARK [OPTIONS]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    table, prog = COMMANDS, "improver"
    if argv[:1] == ["bench"]:
        table, prog, argv = BENCHMARKS, "improver bench", argv[1:]
    if not argv or argv[0] not in table:
        print(overview())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\n{prog}: error: unknown command {argv[0]!r}; choose one of: {', '.join(table)}", file=sys.stderr)
            raise SystemExit(2)
        raise SystemExit(0 if argv else 2)
    bind_nested_configs()
    command = tyro.cli(table[argv[0]], prog=f"{prog} {argv[0]}", args=argv[1:])
    command.run()
    if "torch.distributed" in sys.modules:  # the commands leave the process group of an `accelerate launch` to the end
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
