"""``Improver``: the learned policy-improvement operator, applied like an RL update.

    policy = improver.step(policy, experience)
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import higher
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .io import atomic_path
from .network import ImprovementNet, NetworkConfig
from .policies import placement
from .types import Trajectory

FORMAT_VERSION = 1


class BehaviourPolicy(nn.Module):
    """Acts with the improved-behaviour head ``g`` under a fixed context ``z`` (behaviour mode)."""

    def __init__(self, net: ImprovementNet, z: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("z", z.detach())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Improved actions ``[B, act_dim]`` for observations ``[B, obs_dim]``."""
        obs = observations.to(self.z)
        return self.net.head.act(self.net.normalize(obs), self.z)


class Improver(nn.Module):
    """Watches a policy's experience and returns a better policy.

    Args:
        config: Network sizes (observation and action size of the task family).
        distill_steps: Supervised steps that move a copy of the user's policy toward ``g``.
    """

    def __init__(self, config: NetworkConfig, distill_steps: int = 20) -> None:
        super().__init__()
        self.config = config
        self.net = ImprovementNet(config)
        # Meta-learned: a step size per distillation step and the strength of the trust region.
        self.log_lrs = nn.Parameter(torch.full((distill_steps,), math.log(0.1)))
        self.log_trust = nn.Parameter(torch.tensor(math.log(1e-3)))
        self.reward_model: nn.Module | None = None

    @property
    def distill_steps(self) -> int:
        """Number of distillation steps in parameters mode."""
        return self.log_lrs.numel()

    def _check(self, policy: nn.Module | Any, experience: Trajectory) -> Trajectory:
        obs_dim, act_dim = self.config.obs_dim, self.config.act_dim
        if not isinstance(experience, Trajectory):
            raise TypeError(f"experience must be a Trajectory (from improver.tasks.rollout); got {type(experience).__name__}")
        if experience.observations.shape[-1] != obs_dim:
            raise ValueError(f"this improver was trained on {obs_dim}-d observations; the experience has {experience.observations.shape[-1]}")
        if experience.actions.shape[-1] != act_dim:
            raise ValueError(f"this improver was trained on {act_dim}-d actions; the experience has {experience.actions.shape[-1]}")
        device, dtype = placement(policy)
        with torch.no_grad():
            out = policy(experience.observations[:1, 0].to(device, dtype))
        if tuple(out.shape) != (1, act_dim):
            raise ValueError(f"the policy returns actions of shape {tuple(out.shape[1:])}; the experience's actions have size {act_dim}")
        if experience.rewards is None:
            if self.reward_model is None:
                raise ValueError("the experience has no rewards and this improver has no ranking reward model to supply them")
            experience = replace(experience, rewards=self.reward_model.predict(experience.to("cpu")).to(experience.observations))
        return experience

    def context(self, policy: nn.Module, experience: Trajectory) -> torch.Tensor:
        """Context ``z`` ``[width]`` summarising the policy and its experience."""
        device = self.log_lrs.device
        experience = experience.to(device)
        policy_device, policy_dtype = placement(policy)
        return self.net.context_for(experience, lambda s: policy(s.to(policy_device, policy_dtype)).to(device, torch.float32))

    def step(self, policy: nn.Module, experience: Trajectory, mode: Literal["parameters", "behaviour"] = "parameters") -> nn.Module:
        """One improvement step. The input policy is never modified.

        Args:
            policy: The current policy (any ``nn.Module`` mapping ``[B, obs_dim]`` to ``[B, act_dim]``).
            experience: Episodes collected with ``policy``; rewards may be missing if this improver
                carries a ranking reward model.
            mode: ``"parameters"``: a copy of ``policy`` (same class and architecture) distilled
                toward the improved behaviour; ``"behaviour"``: a module acting with ``g`` and ``z``.

        Returns:
            The improved policy.
        """
        experience = self._check(policy, experience)
        with torch.no_grad():
            z = self.context(policy, experience)
        if mode == "behaviour":
            return BehaviourPolicy(copy.deepcopy(self.net), z).eval()
        if mode != "parameters":
            raise ValueError(f"mode must be 'parameters' or 'behaviour'; got {mode!r}")
        states = experience.observations[experience.mask].to(self.log_lrs.device)
        with torch.no_grad():
            targets = self.net.head.act(self.net.normalize(states), z)
        improved = copy.deepcopy(policy)
        final = self.distill(improved, states, targets, differentiable=False)
        with torch.no_grad():
            for parameter, value in zip(improved.parameters(), final):
                parameter.copy_(value.to(parameter))
        return improved.eval()

    def distill(
        self, policy: nn.Module, states: torch.Tensor, targets: torch.Tensor, differentiable: bool, probe: torch.Tensor | None = None
    ) -> Any:
        """Move ``policy`` toward ``targets`` on ``states`` with the meta-learned steps and trust region.

        With ``differentiable`` the steps are traced by ``higher`` so that a loss on the result
        trains the step sizes, the trust region and ``g``; then the distilled policy's actions on
        ``probe`` are returned. Otherwise the final parameters are returned.
        """
        device, dtype = placement(policy)
        states, targets = states.to(device, dtype), targets.to(device, dtype)
        start = [p.detach().clone() for p in policy.parameters()]
        lrs, trust = self.log_lrs.exp(), self.log_trust.exp()
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        # Distillation needs gradients even when the caller runs step() under torch.no_grad().
        with torch.enable_grad(), higher.innerloop_ctx(policy, optimizer, copy_initial_weights=True, track_higher_grads=differentiable) as (fmodel, diffopt):
            for k in range(self.distill_steps):
                fit = nn.functional.mse_loss(fmodel(states), targets)
                drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(fmodel.parameters(), start))
                diffopt.step(fit + trust.to(dtype) * drift, override={"lr": [lrs[k].to(dtype)]})
            if differentiable:
                return fmodel(probe.to(device, dtype))
            return [p.detach() for p in fmodel.parameters()]

    def save_pretrained(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (with versions) to the folder ``path``, atomically."""
        config = {
            "format_version": FORMAT_VERSION,
            "network": asdict(self.config),
            "distill_steps": self.distill_steps,
            "versions": {p: version(p) for p in ("policy-improver", "torch")},
            "metadata": metadata or {},
        }
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("reward_model.")}, tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Improver:
        """Load an improver written by :meth:`save_pretrained`; a checkpoint that does not fit raises ``ValueError``."""
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not an improver checkpoint: it needs config.json and model.safetensors")
        config = json.loads((path / "config.json").read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: improver checkpoint format {config.get('format_version')!r}; this version reads {FORMAT_VERSION}")
        improver = cls(NetworkConfig(**config["network"]), config["distill_steps"])
        try:
            improver.load_state_dict(load_file(path / "model.safetensors"))
        except RuntimeError as err:
            raise ValueError(f"{path}: weights do not fit the network in config.json: {err}") from err
        return improver.eval()
