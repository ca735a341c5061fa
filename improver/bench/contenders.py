"""The benchmark's contenders behind one interface, found by name in :data:`CONTENDERS`.

A contender is built once per run from a :class:`Setup` (loading or meta-training what it needs)
and then, for every unit (starting policy, seed), improves the starting policy for ``steps`` steps
of ``episodes`` episodes' worth of env steps and returns one :class:`Row` per checkpoint, scored
with :func:`score` so that every contender is judged on the same episodes.

To add a contender, write a factory ``Setup -> Contender | Skipped`` and add one entry to
:data:`CONTENDERS`. Names starting with ``improver-`` are the improver's own; the comparisons of
:mod:`improver.bench.statistics` set them against every other contender.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypedDict

from torch import nn

from ..baselines import Checkpoint
from ..loop import improvement_loop
from ..loop_settings import LoopSettings, Mode
from ..operator import Improver
from ..saved_files import read_json_object
from ..tasks import Task, rollout
from ..tasks.evaluation import spread

if TYPE_CHECKING:  # the protocol imports this module for its registry
    from ..baselines.maml import MetaSGD
    from .protocol import BenchConfig, Start

PPO_GRID = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
"""Multiples of the improver's whole budget at which PPO's longer run is scored (up to the largest asked)."""


class Row(TypedDict):
    """One checkpoint of a contender, scored on the benchmark's episodes."""

    step: int
    """Improvement step (for PPO's longer run: improvement steps' worth of env steps)."""
    env_steps: int
    """Env steps learned from before this checkpoint (evaluation episodes excluded)."""
    success: float
    """Fraction of the scoring episodes whose success flag was set at some step."""
    mean_return: float
    """Mean return of the scoring episodes."""
    wall_s: float
    """Wall time spent learning so far."""


class Contender(Protocol):
    """An improvement method benchmarked against the others on the same starts, episodes and budget."""

    @property
    def name(self) -> str:
        """Its key in :data:`CONTENDERS` and its name in the results."""

    @property
    def note(self) -> str:
        """How it ran, in a sentence or two for the results' notes."""

    @property
    def report(self) -> dict[str, Any] | None:
        """What its preparation measured (e.g. a meta-training report), recorded under ``reports``; or ``None``."""

    def rows(self, policy: nn.Module, tasks: Sequence[Task], budget: int, steps: int, episodes: int, seed: int) -> list[Row]:
        """Improve ``policy`` on ``tasks`` and score every checkpoint with :func:`score`.

        Args:
            policy: The starting policy, mapping ``[B, obs_dim]`` to ``[B, act_dim]``; not modified.
            tasks: Its held-out tasks (episodes go round-robin over them).
            budget: Env steps of experience per improvement step (``episodes`` times the horizon).
            steps: Improvement steps.
            episodes: Episodes per improvement step, and scoring episodes per checkpoint.
            seed: The unit's seed; checkpoint ``k`` is scored with ``seed + k``.

        Returns:
            Rows for steps ``0..steps`` (step 0: the starting policy), possibly followed by later ones.
        """


class Skipped(NamedTuple):
    """What a factory returns for a contender that cannot run (and why, for the results' notes)."""

    name: str
    note: str


class Setup(NamedTuple):
    """What a contender's factory may use: the run's settings and what the run loaded."""

    config: BenchConfig
    """The resolved configuration (loop settings filled in)."""
    starts: tuple[Start, ...]
    """Every starting policy of the run."""
    improver: Improver | None
    """The trained improver, loaded when an ``improver-`` contender is asked for."""
    out: Path
    """The run's output folder (a contender may save what it prepared there)."""
    resumed: bool
    """The folder already holds finished units of this run (use what they were scored with)."""
    progress: bool
    """Show progress bars while preparing."""


ContenderFactory = Callable[[Setup], "Contender | Skipped"]


def evaluate(policy: Any, tasks: Sequence[Task], episodes: int, seed: int) -> tuple[float, float]:
    """Success rate and mean return of ``episodes`` noise-free episodes spread over ``tasks`` (resets seeded by ``seed``)."""
    traj = rollout(policy, spread(tasks, episodes), 1, seed=seed, progress=False)
    return float(traj.success.float().mean()), float(traj.returns.mean())


def score(
    checkpoints: Iterable[Checkpoint], tasks: Sequence[Task], episodes: int, seed: int, steps: Sequence[int] | None = None
) -> list[Row]:
    """Score each checkpoint on the episodes of the improver's step ``k`` (seed ``seed + k``).

    ``k`` is the checkpoint's position, or its entry of ``steps`` (improvement steps' worth of env
    steps, for PPO's longer run).
    """
    rows = []
    for i, c in enumerate(checkpoints):
        k = i if steps is None else steps[i]
        success, mean_return = evaluate(c.policy, tasks, episodes, seed + k)
        rows.append(Row(step=k, env_steps=c.env_steps, success=success, mean_return=mean_return, wall_s=c.wall_s))
    return rows


def improver_rows(
    improver: Improver, policy: nn.Module, tasks: Sequence[Task], settings: LoopSettings, steps: int, episodes: int, seed: int
) -> list[Row]:
    """Run the improvement loop and score its policy after each step like every other contender (without noise).

    The loop collects with ``settings`` (exploration noise included: what the next step watches);
    checkpoint ``k`` learned from the episodes of steps ``0..k-1`` and is scored on ``episodes``
    noise-free episodes of seed ``seed + k`` spread over ``tasks``.

    Returns:
        One row per step ``0..steps``; ``env_steps`` counts the episodes collected before that checkpoint.
    """
    checkpoints, learned = [], 0
    for state in improvement_loop(improver, policy, list(tasks), steps, episodes, seed=seed, progress=False, **asdict(settings)):
        checkpoints.append(Checkpoint(state.policy, learned, state.metrics["wall_s"]))
        learned = state.metrics["env_steps"]
    return score(checkpoints, tasks, episodes, seed)


@dataclass(frozen=True)
class ImproverContender:
    """The improver in one mode, collecting with the benchmark's exploration noise (see :func:`improver_rows`)."""

    improver: Improver
    settings: LoopSettings
    report = None

    @classmethod
    def from_setup(cls, setup: Setup, mode: Mode) -> ImproverContender:
        """The improver of ``setup`` with the protocol's noise and, in behaviour mode, the run's task exploration."""
        if setup.improver is None:
            raise ValueError("the improver contenders need the trained improver in Setup.improver")
        c = setup.config
        offsets = (c.task_exploration, c.wide_task_exploration) if mode == "behaviour" else (0.0, 0.0)
        return cls(setup.improver, LoopSettings(mode, c.noise, offsets[0], offsets[1], c.memory))

    @property
    def name(self) -> str:
        """``improver-behaviour`` or ``improver-parameters``."""
        return f"improver-{self.settings.mode}"

    @property
    def note(self) -> str:
        """The loop's settings."""
        s = self.settings
        aim = (
            f", task exploration {s.task_exploration} ({s.wide_task_exploration or s.task_exploration} after a step whose episodes all failed)"
            if s.mode == "behaviour"
            else ""
        )
        return (
            f"{self.name}: improver.loop.improvement_loop collecting with exploration noise {s.exploration}{aim}, memory {s.memory}; "
            "its policies are scored without noise like every contender's, and its wall time includes collecting its episodes."
        )

    def rows(self, policy: nn.Module, tasks: Sequence[Task], budget: int, steps: int, episodes: int, seed: int) -> list[Row]:
        """See :meth:`Contender.rows` (the loop collects ``episodes`` episodes per step: ``budget`` env steps)."""
        return improver_rows(self.improver, policy, tasks, self.settings, steps, episodes, seed)


@dataclass(frozen=True)
class PPOContender:
    """stable-baselines3 PPO from the starting policy's weights, run on to ``max(multipliers)`` times the whole budget."""

    multipliers: tuple[int, ...]
    ppo_kwargs: dict[str, Any] = field(default_factory=dict)
    name = "ppo"
    report = None

    @classmethod
    def from_setup(cls, setup: Setup) -> PPOContender:
        """PPO with the run's multipliers and extra ``PPO`` arguments."""
        return cls(tuple(setup.config.ppo_multipliers), setup.config.ppo_kwargs)

    @property
    def note(self) -> str:
        """How PPO starts and where its longer run is scored."""
        return (
            "ppo: stable-baselines3 PPO from the starting policy's weights (improver.integrations.sb3.ppo_from_policy), "
            "tanh on the Gaussian mean, one update per episode; its longer run is one run scored at multiples of the improver's budget."
        )

    def rows(self, policy: nn.Module, tasks: Sequence[Task], budget: int, steps: int, episodes: int, seed: int) -> list[Row]:
        """See :meth:`Contender.rows`; after step ``steps`` come the rows at :data:`PPO_GRID` multiples of the whole budget."""
        from ..baselines.ppo import ppo_steps

        grid = list(range(steps + 1)) + [m * steps for m in PPO_GRID if 1 < m <= max(self.multipliers)]
        return score(ppo_steps(policy, tasks, budget, grid, seed=seed, **self.ppo_kwargs), tasks, episodes, seed, grid)


@dataclass(frozen=True)
class BCContender:
    """Filtered behaviour cloning on the best 30% of the policy's own exploring episodes (not learned)."""

    noise: float
    name = "bc"
    report = None

    @classmethod
    def from_setup(cls, setup: Setup) -> BCContender:
        """BC exploring with the protocol's noise."""
        return cls(setup.config.noise)

    @property
    def note(self) -> str:
        """Its exploration noise."""
        return f"bc: filtered behaviour cloning on the best 30% of the policy's own exploring episodes (Gaussian noise {self.noise})."

    def rows(self, policy: nn.Module, tasks: Sequence[Task], budget: int, steps: int, episodes: int, seed: int) -> list[Row]:
        """See :meth:`Contender.rows`."""
        from ..baselines.bc import bc_steps

        return score(bc_steps(policy, spread(tasks, episodes), steps, seed, noise=self.noise), tasks, episodes, seed)


MAML_VARIANTS = {
    "maml": "Meta-SGD step sizes and RWR temperature meta-trained with higher",
    "maml-l2l": "learn2learn's MAML (l2l.algorithms.MAML): a shift of the starting weights and the RWR temperature",
    "metasgd-l2l": "learn2learn's Meta-SGD (l2l.algorithms.MetaSGD): a shift of the starting weights, per-weight step sizes and the RWR temperature",
}
"""The MAML-family contenders: the hand-written one on ``higher`` (:mod:`improver.baselines.maml`) and
learn2learn's MAML and Meta-SGD (:mod:`improver.baselines.l2l`), adapted with the same inner loss."""


@dataclass(frozen=True)
class MamlContender:
    """A MAML-family update (:data:`MAML_VARIANTS`) meta-trained on the train dataset, then applied
    for ``steps`` adaptation steps from each starting policy."""

    update: Any
    note: str
    report: dict[str, Any]
    name: str = "maml"

    @staticmethod
    def _load(variant: str, path: Path) -> Any:
        if variant == "maml":
            from ..baselines.maml import MetaSGD

            return MetaSGD.from_pretrained(path)
        from ..baselines.l2l import L2LUpdate

        return L2LUpdate.from_pretrained(path)

    @classmethod
    def from_setup(cls, setup: Setup, variant: str = "maml") -> MamlContender | Skipped:
        """The update saved by an earlier run (``config.maml_update`` for ``maml``, or ``out/<variant>_update``
        when resuming), else one meta-trained on ``config.data`` and saved to ``out/<variant>_update``;
        skipped without either.

        Raises:
            ValueError: a starting policy has not the architecture the update is (or would be) learned for,
                or the dataset is empty.
        """
        config, folder = setup.config, setup.out / f"{variant}_update"
        # A resumed run keeps the update its finished units were scored with.
        saved = (config.maml_update if variant == "maml" else None) or (folder if setup.resumed and folder.is_dir() else None)
        if saved is not None:
            update = cls._load(variant, saved)
            for s in setup.starts:
                update.check(s.policy)
            report = {**read_json_object(Path(saved) / "config.json")["metadata"], "loaded_from": str(saved)}
            return cls(update, f"{variant}: the update meta-trained by an earlier run was loaded from {saved} (its report is under reports).", report, variant)
        if config.data is None:
            return Skipped(variant, f"{variant}: skipped, no --data train dataset given.")
        from ..augment.dataset import ImprovementDataset

        m = config.maml
        dataset = ImprovementDataset(config.data)
        if len(dataset) == 0:
            raise ValueError(f"the MAML train dataset {config.data} holds no examples")
        # Fail before any training: the update has one step size per weight of the dataset's policies.
        shapes = [tuple(p.shape) for p in dataset.example(0).policy.parameters()]
        for s in setup.starts:
            if [tuple(p.shape) for p in s.policy.parameters()] != shapes:
                raise ValueError(f"starting policy {s.name} does not have the architecture of the policies in {config.data}; {variant} cannot adapt it")
        common = dict(inner_steps=m.inner_steps, noise=config.noise, first_order=m.first_order, seed=0, progress=setup.progress)
        if variant == "maml":
            from ..baselines.maml import meta_train_maml

            update, report = meta_train_maml(dataset, m.examples, m.episodes, m.iterations, outer_lr=m.outer_lr, **common)
        else:
            from ..baselines.l2l import meta_train_l2l

            # learn2learn's uncapped inner steps diverge at the higher version's outer_lr (3e-2): its own default
            update, report = meta_train_l2l(dataset, m.examples, m.episodes, m.iterations, algorithm=variant.removesuffix("-l2l"), **common)
        update.save_pretrained(folder, metadata=report)
        note = (
            f"{variant}: {MAML_VARIANTS[variant]}, meta-trained ({'second' if report['second_order'] else 'first'} order, "
            f"{m.inner_steps} inner steps) on {report['examples']} train examples of {config.data}; the starting policy is the "
            f"initialisation. Its meta-training env steps ({report['env_steps']}) are not counted per step."
        )
        return cls(update, note, report, variant)

    def rows(self, policy: nn.Module, tasks: Sequence[Task], budget: int, steps: int, episodes: int, seed: int) -> list[Row]:
        """See :meth:`Contender.rows`."""
        from ..baselines.maml import maml_steps

        return score(maml_steps(self.update, policy, spread(tasks, episodes), steps, seed), tasks, episodes, seed)


CONTENDERS: dict[str, ContenderFactory] = {
    "improver-behaviour": partial(ImproverContender.from_setup, mode="behaviour"),
    "improver-parameters": partial(ImproverContender.from_setup, mode="parameters"),
    "ppo": PPOContender.from_setup,
    "maml": MamlContender.from_setup,
    "maml-l2l": partial(MamlContender.from_setup, variant="maml-l2l"),
    "metasgd-l2l": partial(MamlContender.from_setup, variant="metasgd-l2l"),
    "bc": BCContender.from_setup,
}
"""Every contender the benchmark knows, by name, in table order: the factory that builds it for a run."""

DEFAULT_CONTENDERS = ("improver-behaviour", "improver-parameters", "ppo", "maml", "bc")
"""The contenders a benchmark runs unless told otherwise (the learn2learn ones on request)."""
