"""MAML-style gradient adaptation of a given policy, meta-trained with ``higher`` on the train tasks.

Every contender of the benchmark starts from the same lesser policy, so the MAML initialisation
cannot be learned; what is meta-learned is the update applied to it (Meta-SGD, Li et al. 2017):
a step size per weight and the temperature of the inner loss. The inner loss is the
reward-weighted regression of :mod:`improver.baselines.bc` on the policy's own exploring episodes;
``inner_steps`` gradient steps of it (gradients bounded to norm 1, as the improver's distillation
does, so one large gradient cannot throw the policy far) give the adapted policy.

Meta-training differentiates through those steps (second order by default; ``first_order``
drops the second derivatives) with ``higher``'s functional copy of the policy. The outer loss is
the adapted policy's squared error to the expert's actions on the states the lesser policy
visited: the same supervision the improver is meta-trained with, from the same dataset
(``improver generate --split train``).

The inner data (:func:`collect_inner_data`), the outer loop (:func:`meta_train_loop`), its report
and :func:`maml_steps` serve the learn2learn baselines of :mod:`improver.baselines.l2l` as well.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Self

import higher
import torch
from torch import nn
from tqdm.auto import tqdm

from improver.io import FolderKind, atomic_path
from improver.saved_files import check_keys, load_weights, read_json_object, write_weights
from improver.tasks import Task, make_suite
from improver.types import Trajectory

from . import Checkpoint
from .bc import collect_exploring, episode_weights, weighted_regression_loss


class MetaUpdate(nn.Module):
    """A meta-learned update of a policy architecture, saved as ``config.json`` + ``model.safetensors``.

    Subclasses set ``self.config`` (with the keyword arguments of their ``__init__`` after
    ``policy``, ``noise`` and ``inner_steps`` among them, plus ``"shapes"``) and implement
    :meth:`adapted_weights`; this class checks, applies, saves and loads them.

    Args:
        policy: A policy of the architecture the update is for (its parameter shapes are used).
    """

    kind = "MAML update"
    """What a saved update is called in messages and in its folder's kind."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.shapes = [tuple(p.shape) for p in policy.parameters()]
        self.config: dict[str, Any] = {}

    @property
    def inner_steps(self) -> int:
        """Gradient steps per adaptation."""
        return self.config["inner_steps"]

    @property
    def noise(self) -> float:
        """Exploration noise of the episodes adapted on."""
        return self.config["noise"]

    def check(self, policy: nn.Module) -> None:
        """Raise ``ValueError`` unless ``policy`` has the parameter shapes this update was learned for."""
        shapes = [tuple(p.shape) for p in policy.parameters()]
        if shapes != self.shapes:
            raise ValueError(f"this {self.kind} was meta-trained for parameter shapes {self.shapes}; the policy has {shapes}")

    def adapted_weights(self, policy: nn.Module, experience: Trajectory, first: bool = True) -> list[torch.Tensor]:
        """``policy``'s weights (in ``parameters()`` order) after adapting on ``experience``, without the meta-gradient's graph.

        ``first``: whether ``policy`` is a starting policy rather than the result of an earlier
        adaptation (a meta-learned initialisation applies to starting policies only).
        """
        raise NotImplementedError

    def adapt(self, policy: nn.Module, experience: Trajectory, first: bool = True) -> nn.Module:
        """A copy of ``policy`` adapted on ``experience`` (its exploring episodes); ``policy`` is not modified.

        ``first``: as in :meth:`adapted_weights`; pass ``False`` when ``policy`` came out of this update.
        """
        self.check(policy)
        with torch.enable_grad():  # the benchmark may call this under no_grad; the inner steps need gradients
            params = self.adapted_weights(policy, experience, first)
        adapted = copy.deepcopy(policy)
        with torch.no_grad():
            for target, value in zip(adapted.parameters(), params):
                target.copy_(value.detach())
        return adapted.eval()

    def save_pretrained(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` to the folder ``path``, atomically."""
        with atomic_path(path, FolderKind(self.kind, {"config", "metadata"})) as tmp:
            tmp.mkdir()
            write_weights(self.state_dict(), tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps({"config": self.config, "metadata": metadata or {}}, indent=2))
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Self:
        """Read an update written by :meth:`save_pretrained`."""
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not a saved {cls.kind}: it needs config.json and model.safetensors")
        saved = read_json_object(path / "config.json")
        check_keys(saved, path / "config.json", ("config", "metadata"))
        try:
            config = dict(saved["config"])
            template = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in config.pop("shapes")])
            update = cls(template, **config)
        except (TypeError, ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"{path / 'config.json'} describes no valid {cls.kind}: {err!r}") from err
        load_weights(update, path / "model.safetensors")
        return update


class MetaSGD(MetaUpdate):
    """The meta-learned update: per-weight step sizes and the inner loss's temperature.

    Args:
        policy: A policy of the architecture the update is for (its parameter shapes are used).
        inner_steps: Gradient steps per adaptation.
        lr: Initial step size of every weight.
        temperature: Initial temperature of the reward-weighted regression.
        noise: Exploration noise of the episodes the update learns from (a fixed setting).
    """

    def __init__(self, policy: nn.Module, inner_steps: int = 5, lr: float = 0.1, temperature: float = 1.0, noise: float = 0.3) -> None:
        super().__init__(policy)
        if inner_steps < 1 or lr <= 0 or temperature <= 0 or noise <= 0:
            raise ValueError(f"inner_steps, lr, temperature and noise must be positive; got {inner_steps}, {lr}, {temperature}, {noise}")
        self.log_lrs = nn.ParameterList([nn.Parameter(torch.full(s, math.log(lr))) for s in self.shapes])
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.config = {"inner_steps": inner_steps, "lr": lr, "temperature": temperature, "noise": noise, "shapes": [list(s) for s in self.shapes]}

    def adapted_parameters(
        self, fmodel: Any, start: Sequence[torch.Tensor], experience: Trajectory, first_order: bool = False
    ) -> list[torch.Tensor]:
        """Fast weights after ``inner_steps`` steps from the weights ``start`` of ``fmodel`` (a ``higher`` functional policy).

        ``start`` is passed explicitly because a functional policy's ``parameters()`` are the last
        weights it was called with. Differentiable with respect to this module's parameters (and,
        unless ``first_order``, through the inner gradients).
        """
        params = list(start)
        weights = episode_weights(experience.returns, "rwr", temperature=self.log_temperature.exp())
        for _ in range(self.inner_steps):
            loss = weighted_regression_loss(fmodel(experience.observations, params=params), experience, weights)
            grads = torch.autograd.grad(loss, params, create_graph=not first_order)
            # Bounded like the improver's distillation: the step sizes, not the gradient's scale, set the move.
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            scale = 1.0 / torch.clamp(norm, min=1.0)
            params = [p - lr.exp() * g * scale for p, lr, g in zip(params, self.log_lrs, grads)]
        return params

    def adapted_weights(self, policy: nn.Module, experience: Trajectory, first: bool = True) -> list[torch.Tensor]:
        """See :meth:`MetaUpdate.adapted_weights` (first order, through a ``higher`` functional copy; no initialisation is learned, so ``first`` changes nothing)."""
        fmodel = higher.monkeypatch(policy, copy_initial_weights=True, track_higher_grads=False)
        return self.adapted_parameters(fmodel, list(fmodel.parameters()), experience, first_order=True)


def _task_of(trajectory: Trajectory) -> Task:
    info = trajectory.tasks[0]
    return make_suite(info.suite, info.suite_seed).tasks(info.split)[info.index]


class InnerData(NamedTuple):
    """One meta-training example: a lesser policy, what it adapts on, and what it is judged on.

    Attributes:
        policy: The lesser policy (the starting weights of the adaptation).
        experience: Its ``episodes`` exploring episodes on its own task (the inner loss's data).
        states: The states it visited, ``[N, obs_dim]``.
        targets: The expert's actions on ``states``, ``[N, act_dim]`` (the outer loss's targets).
    """

    policy: nn.Module
    experience: Trajectory
    states: torch.Tensor
    targets: torch.Tensor


def collect_inner_data(dataset: Any, examples: int, episodes: int, noise: float, seed: int, progress: bool = True) -> list[InnerData]:
    """The meta-training data of the MAML baselines: ``examples`` examples spread evenly over ``dataset``.

    Each example's lesser policy runs ``episodes`` exploring episodes (noise ``noise``, seeded by
    ``seed`` plus the example's position) on its own task, once.

    Raises:
        ValueError: ``dataset`` is empty.
    """
    if len(dataset) == 0:
        raise ValueError("the MAML baseline needs a non-empty train dataset")
    chosen = sorted({round(i * (len(dataset) - 1) / max(1, examples - 1)) for i in range(min(examples, len(dataset)))})
    items = []
    for n, i in enumerate(tqdm(chosen, desc="MAML inner data", unit="example", disable=not progress)):
        example = dataset.example(i)
        experience = collect_exploring(example.policy, [_task_of(example.lesser)] * episodes, noise, seed=seed + n)
        mask = example.lesser.mask
        items.append(InnerData(example.policy, experience, example.lesser.observations[mask], example.target_actions[mask]))
    return items


def meta_train_loop(
    update: nn.Module,
    outer_loss: Callable[[int], torch.Tensor],
    examples: int,
    iterations: int,
    batch_size: int,
    outer_lr: float,
    seed: int,
    progress: bool = True,
) -> list[float]:
    """Adam on ``update``'s parameters: per iteration, the mean of ``outer_loss(j)`` over a random batch of example indices.

    Each example's loss is backpropagated on its own (the graphs through the inner steps are not
    all held at once).

    Returns:
        The batch's outer loss at every iteration, ``iterations`` floats.
    """
    optimizer = torch.optim.Adam(update.parameters(), lr=outer_lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(iterations), desc="MAML meta-train", unit="it", disable=not progress):
        batch = torch.randperm(examples, generator=generator)[:batch_size].tolist()
        optimizer.zero_grad()
        total = 0.0
        for j in batch:
            loss = outer_loss(j) / len(batch)
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        losses.append(total)
    return losses


def meta_train_report(
    items: Sequence[InnerData], losses: Sequence[float], episodes: int, outer_lr: float, inner_steps: int, first_order: bool, start: float
) -> dict[str, Any]:
    """What meta-training measured: env steps collected, outer losses (unadapted, first, last ten), wall time since ``start``."""
    with torch.no_grad():
        unadapted = sum(float(nn.functional.mse_loss(i.policy(i.states), i.targets)) for i in items) / len(items)
    return {
        "examples": len(items),
        "episodes_per_example": episodes,
        "env_steps": sum(int(i.experience.lengths.sum()) for i in items),
        "iterations": len(losses),
        "outer_lr": outer_lr,
        "inner_steps": inner_steps,
        "second_order": not first_order,
        "outer_loss_unadapted": unadapted,
        "outer_loss_first": losses[0],
        "outer_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "wall_s": time.perf_counter() - start,
    }


def meta_train_maml(
    dataset: Any,
    examples: int = 16,
    episodes: int = 4,
    iterations: int = 100,
    batch_size: int = 4,
    outer_lr: float = 3e-2,
    inner_steps: int = 5,
    noise: float = 0.3,
    first_order: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> tuple[MetaSGD, dict[str, Any]]:
    """Meta-train a :class:`MetaSGD` update on an improvement dataset's train tasks.

    For ``examples`` examples spread over the dataset, the lesser policy's ``episodes`` exploring
    episodes on its own task are collected once (the inner data); each iteration adapts a batch
    of lesser policies and steps Adam on the adapted policies' error to the expert's actions.

    Returns:
        The update and a report: env steps collected, wall time, first and last outer losses,
        the loss of the unadapted policies, and whether second derivatives were used.
    """
    start = time.perf_counter()
    items = collect_inner_data(dataset, examples, episodes, noise, seed, progress)
    update = MetaSGD(items[0].policy, inner_steps, noise=noise)
    for item in items:
        update.check(item.policy)
    # One functional copy per example, reused every iteration (patching a module is not free).
    fmodels = [higher.monkeypatch(item.policy, copy_initial_weights=True) for item in items]
    initials = [list(f.parameters()) for f in fmodels]

    def outer_loss(j: int) -> torch.Tensor:
        params = update.adapted_parameters(fmodels[j], initials[j], items[j].experience, first_order)
        return nn.functional.mse_loss(fmodels[j](items[j].states, params=params), items[j].targets)

    losses = meta_train_loop(update, outer_loss, len(items), iterations, batch_size, outer_lr, seed, progress)
    return update, meta_train_report(items, losses, episodes, outer_lr, inner_steps, first_order, start)


def maml_steps(update: MetaUpdate, policy: nn.Module, tasks: Sequence[Task], steps: int, seed: int = 0) -> Iterator[Checkpoint]:
    """Adapt ``policy`` with ``update`` once per step, each time on one exploring episode per entry of ``tasks``.

    A meta-learned initialisation (learn2learn's) is applied at the first step only, as MAML's
    initialisation is: later steps continue from the adapted weights with the inner steps alone.

    Yields the starting policy and then the policy after each of ``steps`` steps.
    """
    update.check(policy)
    env_steps, wall = 0, 0.0
    yield Checkpoint(policy, 0, 0.0)
    for k in range(steps):
        start = time.perf_counter()
        # The same resets as the improver's step-k episodes (improver.loop.improve seeds step k with seed + k).
        experience = collect_exploring(policy, tasks, update.noise, seed=seed + k)
        policy = update.adapt(policy, experience, first=k == 0)
        env_steps += int(experience.lengths.sum())
        wall += time.perf_counter() - start
        yield Checkpoint(policy, env_steps, wall)
