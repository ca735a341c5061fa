"""stable-baselines3: improve an SB3 model's policy with ``Improver.step``.

SB3 policies return ``(actions, values, log_probs)`` and sample; the improver needs a
deterministic ``observations -> actions`` module, which :class:`SB3Actor` provides.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from improver.operator import Improver
from improver.types import Trajectory


class SB3Actor(nn.Module):
    """The deterministic action (the action distribution's mode) of an SB3 ``ActorCriticPolicy``."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Mode of ``pi(. | observations)``, ``[B, act_dim]`` (differentiable)."""
        return self.policy.get_distribution(observations).mode()


def improve_sb3(improver: Improver, model: Any, experience: Trajectory) -> Any:
    """One improvement step of ``model.policy`` (PPO, A2C, ...), written back into ``model``.

    Returns ``model``, which keeps predicting, learning and saving as usual.
    """
    improved = improver.step(SB3Actor(model.policy), experience)
    model.policy.load_state_dict(improved.policy.state_dict())
    return model
