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
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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


class MetaSGD(nn.Module):
    """The meta-learned update: per-weight step sizes and the inner loss's temperature.

    Args:
        policy: A policy of the architecture the update is for (its parameter shapes are used).
        inner_steps: Gradient steps per adaptation.
        lr: Initial step size of every weight.
        temperature: Initial temperature of the reward-weighted regression.
        noise: Exploration noise of the episodes the update learns from (a fixed setting).
    """

    def __init__(self, policy: nn.Module, inner_steps: int = 5, lr: float = 0.1, temperature: float = 1.0, noise: float = 0.3) -> None:
        super().__init__()
        if inner_steps < 1 or lr <= 0 or temperature <= 0 or noise <= 0:
            raise ValueError(f"inner_steps, lr, temperature and noise must be positive; got {inner_steps}, {lr}, {temperature}, {noise}")
        self.shapes = [tuple(p.shape) for p in policy.parameters()]
        self.log_lrs = nn.ParameterList([nn.Parameter(torch.full(s, math.log(lr))) for s in self.shapes])
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.config = {"inner_steps": inner_steps, "lr": lr, "temperature": temperature, "noise": noise, "shapes": [list(s) for s in self.shapes]}

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
            raise ValueError(f"this MAML update was meta-trained for parameter shapes {self.shapes}; the policy has {shapes}")

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

    def adapt(self, policy: nn.Module, experience: Trajectory) -> nn.Module:
        """A copy of ``policy`` adapted on ``experience`` (its exploring episodes); ``policy`` is not modified."""
        self.check(policy)
        with torch.enable_grad():
            fmodel = higher.monkeypatch(policy, copy_initial_weights=True, track_higher_grads=False)
            params = self.adapted_parameters(fmodel, list(fmodel.parameters()), experience, first_order=True)
        adapted = copy.deepcopy(policy)
        with torch.no_grad():
            for target, value in zip(adapted.parameters(), params):
                target.copy_(value.detach())
        return adapted.eval()

    def save_pretrained(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` to the folder ``path``, atomically."""
        with atomic_path(path, FolderKind("MAML update", {"config", "metadata"})) as tmp:
            tmp.mkdir()
            write_weights(self.state_dict(), tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps({"config": self.config, "metadata": metadata or {}}, indent=2))
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> MetaSGD:
        """Read an update written by :meth:`save_pretrained`."""
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not a saved MAML update: it needs config.json and model.safetensors")
        saved = read_json_object(path / "config.json")
        check_keys(saved, path / "config.json", ("config", "metadata"))
        try:
            config = saved["config"]
            template = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in config["shapes"]])
            update = cls(template, config["inner_steps"], config["lr"], config["temperature"], config["noise"])
        except (TypeError, ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"{path / 'config.json'} describes no valid MAML update: {err!r}") from err
        load_weights(update, path / "model.safetensors")
        return update


def _task_of(trajectory: Trajectory) -> Task:
    info = trajectory.tasks[0]
    return make_suite(info.suite, info.suite_seed).tasks(info.split)[info.index]


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
    if len(dataset) == 0:
        raise ValueError("the MAML baseline needs a non-empty train dataset")
    start = time.perf_counter()
    chosen = sorted({round(i * (len(dataset) - 1) / max(1, examples - 1)) for i in range(min(examples, len(dataset)))})
    items = []
    for n, i in enumerate(tqdm(chosen, desc="MAML inner data", unit="example", disable=not progress)):
        example = dataset.example(i)
        task = _task_of(example.lesser)
        experience = collect_exploring(example.policy, [task] * episodes, noise, seed=seed + n)
        mask = example.lesser.mask
        # One functional copy per example, reused every iteration (patching a module is not free).
        fmodel = higher.monkeypatch(example.policy, copy_initial_weights=True)
        items.append((example.policy, (fmodel, list(fmodel.parameters())), experience, example.lesser.observations[mask], example.target_actions[mask]))
    update = MetaSGD(items[0][0], inner_steps, noise=noise)
    for policy, *_ in items:
        update.check(policy)
    optimizer = torch.optim.Adam(update.parameters(), lr=outer_lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(iterations), desc="MAML meta-train", unit="it", disable=not progress):
        batch = torch.randperm(len(items), generator=generator)[:batch_size].tolist()
        optimizer.zero_grad()
        total = 0.0
        for j in batch:
            _, (fmodel, initial), experience, states, targets = items[j]
            params = update.adapted_parameters(fmodel, initial, experience, first_order)
            loss = nn.functional.mse_loss(fmodel(states, params=params), targets) / len(batch)
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        losses.append(total)
    with torch.no_grad():
        unadapted = sum(float(nn.functional.mse_loss(p(s), t)) for p, _, _, s, t in items) / len(items)
    report = {
        "examples": len(items),
        "episodes_per_example": episodes,
        "env_steps": sum(int(e.lengths.sum()) for _, _, e, _, _ in items),
        "iterations": iterations,
        "outer_lr": outer_lr,
        "inner_steps": inner_steps,
        "second_order": not first_order,
        "outer_loss_unadapted": unadapted,
        "outer_loss_first": losses[0],
        "outer_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "wall_s": time.perf_counter() - start,
    }
    return update, report


def maml_steps(update: MetaSGD, policy: nn.Module, tasks: Sequence[Task], steps: int, seed: int = 0) -> Iterator[Checkpoint]:
    """Adapt ``policy`` with ``update`` once per step, each time on one exploring episode per entry of ``tasks``.

    Yields the starting policy and then the policy after each of ``steps`` steps.
    """
    update.check(policy)
    env_steps, wall = 0, 0.0
    yield Checkpoint(policy, 0, 0.0)
    for k in range(steps):
        start = time.perf_counter()
        # The same resets as the improver's step-k episodes (improver.loop.improve seeds step k with seed + k).
        experience = collect_exploring(policy, tasks, update.noise, seed=seed + k)
        policy = update.adapt(policy, experience)
        env_steps += int(experience.lengths.sum())
        wall += time.perf_counter() - start
        yield Checkpoint(policy, env_steps, wall)
