"""MAML and Meta-SGD baselines on learn2learn (``l2l.algorithms.MAML``, ``l2l.algorithms.MetaSGD``).

The same contender as :mod:`improver.baselines.maml` (same inner data, inner loss, outer loss,
meta-training loop and adaptation loop), with the meta-learning done by learn2learn's textbook
algorithms instead of the hand-written ``higher`` one, so that results can be set against the
implementations researchers know:

- ``"maml"``: ``l2l.algorithms.MAML`` (Finn et al. 2017): a meta-learned initialisation, a fixed
  inner step size.
- ``"metasgd"``: ``l2l.algorithms.MetaSGD`` (Li et al. 2017): a meta-learned initialisation and a
  meta-learned step size per weight.

Every contender of the benchmark starts from the same given policy, so the initialisation is
meta-learned as a shift ``delta`` added to whatever weights are adapted (zero at the start of
meta-training): the first adaptation of a starting policy maps its weights ``theta`` to
``theta + delta`` followed by ``inner_steps`` learn2learn ``adapt`` steps of the reward-weighted
regression of :mod:`improver.baselines.bc` (whose temperature is meta-learned too, as in the
``higher`` baseline); a later adaptation of an adapted policy takes the inner steps from its
weights alone (adding ``delta`` at every step compounds it: measured on held-out ML1:reach-v3,
8 units, the mean return fell from 2,087 after step 1 to 232 after step 3). Unlike the ``higher``
baseline, the inner gradients are not bounded in norm (learn2learn's ``adapt`` steps on the raw gradient).

learn2learn 0.2.0 is installed by ``scripts/setup.sh`` (built from its sdist: its PyPI release
does not build on Python 3.11). Adapt with :func:`improver.baselines.maml.maml_steps`, which
takes an :class:`L2LUpdate` as it takes a :class:`~improver.baselines.maml.MetaSGD`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import learn2learn as l2l
import torch
from torch import nn
from torch.func import functional_call

from improver.types import Trajectory

from .bc import episode_weights, weighted_regression_loss
from .maml import MetaUpdate, collect_inner_data, meta_train_loop, meta_train_report

Algorithm = Literal["maml", "metasgd"]
ALGORITHMS: tuple[Algorithm, ...] = ("maml", "metasgd")


def call_with(policy: nn.Module, weights: Sequence[torch.Tensor], observations: torch.Tensor) -> torch.Tensor:
    """``policy``'s actions ``[..., act_dim]`` on ``observations`` ``[..., obs_dim]`` with ``weights`` (in ``parameters()`` order) in place of its own."""
    names = [name for name, _ in policy.named_parameters()]
    return functional_call(policy, dict(zip(names, weights)), (observations,))


class Shifted(nn.Module):
    """A policy's weights plus a learned shift: the module learn2learn wraps, adapts and meta-learns.

    It holds only the shift (one tensor per weight of the policy); the policy and its starting
    weights are arguments, so one meta-learned shift serves every starting policy of an architecture.

    Args:
        shapes: The policy's parameter shapes, in ``parameters()`` order.
    """

    def __init__(self, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.shift = nn.ParameterList([nn.Parameter(torch.zeros(tuple(s))) for s in shapes])

    def forward(self, policy: nn.Module, start: Sequence[torch.Tensor], observations: torch.Tensor) -> torch.Tensor:
        """``policy``'s actions ``[..., act_dim]`` on ``observations`` ``[..., obs_dim]`` with weights ``start + shift``."""
        return call_with(policy, [s + d for s, d in zip(start, self.shift)], observations)


class L2LUpdate(MetaUpdate):
    """The meta-learned update of a learn2learn algorithm: initialisation shift (and step sizes), temperature.

    Checked, applied, saved and loaded as every :class:`~improver.baselines.maml.MetaUpdate`.

    Args:
        policy: A policy of the architecture the update is for (its parameter shapes are used).
        algorithm: ``"maml"`` (``l2l.algorithms.MAML``) or ``"metasgd"`` (``l2l.algorithms.MetaSGD``).
        inner_steps: learn2learn ``adapt`` steps per adaptation.
        lr: Inner step size (MAML: fixed; Meta-SGD: the initial step size of every weight).
        temperature: Initial temperature of the reward-weighted regression.
        noise: Exploration noise of the episodes the update learns from (a fixed setting).
        first_order: Meta-train without second derivatives (learn2learn's ``first_order``).
    """

    kind = "learn2learn update"

    def __init__(
        self,
        policy: nn.Module,
        algorithm: Algorithm = "maml",
        inner_steps: int = 5,
        lr: float = 0.1,
        temperature: float = 1.0,
        noise: float = 0.3,
        first_order: bool = False,
    ) -> None:
        super().__init__(policy)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}; got {algorithm!r}")
        if inner_steps < 1 or lr <= 0 or temperature <= 0 or noise <= 0:
            raise ValueError(f"inner_steps, lr, temperature and noise must be positive; got {inner_steps}, {lr}, {temperature}, {noise}")
        wrapper = l2l.algorithms.MAML if algorithm == "maml" else l2l.algorithms.MetaSGD
        self.learner = wrapper(Shifted(self.shapes), lr=lr, first_order=first_order)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.config = {
            "algorithm": algorithm, "inner_steps": inner_steps, "lr": lr, "temperature": temperature, "noise": noise,
            "first_order": first_order, "shapes": [list(s) for s in self.shapes],
        }  # fmt: skip

    def adapted_parameters(
        self, policy: nn.Module, experience: Trajectory, first_order: bool | None = None, first: bool = True
    ) -> list[torch.Tensor]:
        """Weights of ``policy`` adapted on ``experience`` by a learn2learn clone of the update.

        Differentiable with respect to this module's parameters (second order unless
        ``first_order``; ``None``: the setting the update was made with), not ``policy``'s.
        ``first``: start from ``policy``'s weights plus the learned shift; otherwise from its weights.
        """
        start = [p.detach() for p in policy.parameters()]
        learner = self.learner.clone()
        if not first:  # the forward adds the shift back, so the inner steps start from the weights themselves
            start = [s - d.detach() for s, d in zip(start, learner.module.shift)]
        weights = episode_weights(experience.returns, "rwr", temperature=self.log_temperature.exp())
        for _ in range(self.inner_steps):
            loss = weighted_regression_loss(learner(policy, start, experience.observations), experience, weights)
            learner.adapt(loss, first_order=first_order)
        return [s + d for s, d in zip(start, learner.module.shift)]

    def adapted_weights(self, policy: nn.Module, experience: Trajectory, first: bool = True) -> list[torch.Tensor]:
        """See :meth:`~improver.baselines.maml.MetaUpdate.adapted_weights` (first order)."""
        return self.adapted_parameters(policy, experience, first_order=True, first=first)


def meta_train_l2l(
    dataset: Any,
    examples: int = 16,
    episodes: int = 4,
    iterations: int = 100,
    batch_size: int = 4,
    outer_lr: float = 3e-3,
    inner_steps: int = 5,
    noise: float = 0.3,
    first_order: bool = False,
    seed: int = 0,
    progress: bool = True,
    algorithm: Algorithm = "maml",
    lr: float = 0.1,
) -> tuple[L2LUpdate, dict[str, Any]]:
    """Meta-train an :class:`L2LUpdate` on an improvement dataset's train tasks.

    Arguments, data and loop as :func:`~improver.baselines.maml.meta_train_maml`; ``algorithm``
    picks learn2learn's MAML or Meta-SGD and ``lr`` is the inner step size. ``outer_lr`` is
    smaller by default than ``meta_train_maml``'s: Adam moves every meta-parameter by about
    ``outer_lr`` per iteration, and here these are weight shifts and raw step sizes, not log step
    sizes (toy suite, 6 examples, 40 iterations: from 0.48, 3e-2 drives the outer loss up to
    1.4-1.5, 3e-3 brings it down to 0.21-0.26 and 1e-3 to 0.41).

    Returns:
        The update and a report: that of ``meta_train_maml`` plus ``algorithm`` and ``inner_lr``.

    Raises:
        ValueError: ``dataset`` is empty, its policies differ in architecture, or a setting is out of range.
    """
    start = time.perf_counter()
    items = collect_inner_data(dataset, examples, episodes, noise, seed, progress)
    update = L2LUpdate(items[0].policy, algorithm, inner_steps, lr, noise=noise, first_order=first_order)
    for item in items:
        update.check(item.policy)

    def outer_loss(j: int) -> torch.Tensor:
        item = items[j]
        params = update.adapted_parameters(item.policy, item.experience)
        return nn.functional.mse_loss(call_with(item.policy, params, item.states), item.targets)

    losses = meta_train_loop(update, outer_loss, len(items), iterations, batch_size, outer_lr, seed, progress)
    report = meta_train_report(items, losses, episodes, outer_lr, inner_steps, first_order, start)
    return update, {**report, "algorithm": algorithm, "inner_lr": lr}
