"""The Watch-Try-Learn-style improvement network.

It watches a lesser policy's experience (states, actions, rewards, success flags, optionally
frames) and the policy itself (through a fingerprint: its actions on probe states), summarises
them into a context ``z``, and predicts better behaviour ``g(a | s, z)`` as a Gaussian mixture.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from .types import Trajectory


@dataclass(frozen=True)
class NetworkConfig:
    """Sizes of the improvement network."""

    obs_dim: int
    """Observation size of the task family."""
    act_dim: int
    """Action size."""
    width: int = 64
    """Token and context width."""
    layers: int = 2
    """Transformer layers of the experience encoder."""
    heads: int = 4
    """Attention heads."""
    token_stride: int = 10
    """One token every this many steps (attention over 500-step episodes is too costly on CPU)."""
    probes: int = 16
    """Probe states for the policy fingerprint."""
    components: int = 3
    """Gaussian mixture components of the behaviour head (Watch-Try-Learn uses a mixture)."""
    use_frames: bool = False
    """Also encode rendered frames (spatial-softmax keypoints)."""
    keypoints: int = 8
    """Keypoints of the frame encoder."""


class SpatialSoftmax(nn.Module):
    """Expected image coordinates of each channel's softmax: ``[N, C, H, W] -> [N, 2C]`` keypoints."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, c, h, w = features.shape
        weights = features.flatten(2).softmax(dim=-1).view(n, c, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device, dtype=features.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device, dtype=features.dtype)
        return torch.cat([(weights.sum(dim=3) * ys).sum(dim=2), (weights.sum(dim=2) * xs).sum(dim=2)], dim=1)


class FrameEncoder(nn.Module):
    """Small conv net with layer norm and spatial-softmax keypoints, as in Watch-Try-Learn."""

    def __init__(self, keypoints: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2), nn.GroupNorm(1, 16), nn.ReLU(),
            nn.Conv2d(16, keypoints, 3), nn.GroupNorm(1, keypoints), nn.ReLU(),
        )
        self.keypoints = SpatialSoftmax()
        self.out = nn.Linear(2 * keypoints, width)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` uint8 -> ``[N, width]``."""
        return self.out(self.keypoints(self.conv(frames.float() / 255.0)))


class MixtureHead(nn.Module):
    """``g(a | s, z)``: a Gaussian mixture over actions, conditioned on the state and the context."""

    def __init__(self, obs_dim: int, act_dim: int, width: int, components: int) -> None:
        super().__init__()
        self.act_dim, self.components = act_dim, components
        self.net = nn.Sequential(
            nn.Linear(obs_dim + width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 2 * width), nn.ReLU(),
            nn.Linear(2 * width, components * (2 * act_dim + 1)),
        )

    def forward(self, obs: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Means ``[..., K, act]``, log-stds ``[..., K, act]`` and logits ``[..., K]``."""
        out = self.net(torch.cat([obs, z.expand(*obs.shape[:-1], z.shape[-1])], dim=-1))
        k, a = self.components, self.act_dim
        means = out[..., : k * a].unflatten(-1, (k, a))
        # Targets are often exactly +-1 (clipped); a floor on the std keeps a component from
        # collapsing onto that corner and winning the likelihood everywhere.
        log_stds = out[..., k * a : 2 * k * a].unflatten(-1, (k, a)).clamp(-3.0, 1.0)
        return means, log_stds, out[..., 2 * k * a :]

    def log_prob(self, obs: torch.Tensor, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``log g(actions | obs, z)`` per row."""
        means, log_stds, logits = self(obs, z)
        normal = torch.distributions.Normal(means, log_stds.exp())
        return torch.logsumexp(logits.log_softmax(dim=-1) + normal.log_prob(actions.unsqueeze(-2)).sum(dim=-1), dim=-1)

    def act(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The mean of the most likely component, clipped to ``[-1, 1]``: a deterministic improved action."""
        means, _, logits = self(obs, z)
        best = logits.argmax(dim=-1, keepdim=True)
        return means.gather(-2, best.unsqueeze(-1).expand(*best.shape, means.shape[-1])).squeeze(-2).clamp(-1.0, 1.0)


class ImprovementNet(nn.Module):
    """Encode ``(experience, policy)`` into ``z`` and predict improved actions with ``g(a | s, z)``."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.register_buffer("obs_mean", torch.zeros(config.obs_dim))
        self.register_buffer("obs_std", torch.ones(config.obs_dim))
        self.register_buffer("reward_scale", torch.ones(()))
        # token: state, action, reward, success flag, time
        self.step_in = nn.Linear(config.obs_dim + config.act_dim + 3, width)
        self.frames = FrameEncoder(config.keypoints, width) if config.use_frames else None
        layer = nn.TransformerEncoderLayer(width, config.heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.fingerprint = nn.Sequential(nn.Linear(config.obs_dim + config.act_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.context = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, width))
        self.head = MixtureHead(config.obs_dim, config.act_dim, width, config.components)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """Observations scaled by the meta-training data's statistics."""
        return (obs - self.obs_mean) / self.obs_std

    def token_steps(self, steps: int) -> torch.Tensor:
        """Step indices that become tokens."""
        return torch.arange(0, steps, self.config.token_stride)

    def probe_index(self, count: int) -> torch.Tensor:
        """Indices of ``config.probes`` probe points spread evenly over ``count`` candidates."""
        return torch.linspace(0, count - 1, self.config.probes).round().long()

    def encode(self, experience: Trajectory, policy_actions: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
        """Context ``z`` ``[width]`` from one batch of episodes and the policy's actions on ``probes``."""
        steps = self.token_steps(experience.observations.shape[1]).to(experience.observations.device)
        obs = self.normalize(experience.observations[:, steps])
        rewards = experience.rewards if experience.rewards is not None else torch.zeros_like(experience.mask, dtype=obs.dtype)
        time = (steps.to(obs.dtype) / max(1, experience.observations.shape[1]))[None, :, None].expand(obs.shape[0], -1, 1)
        features = [obs, experience.actions[:, steps], (rewards[:, steps] / self.reward_scale)[..., None],
                    experience.successes[:, steps, None].to(obs.dtype), time]
        tokens = self.step_in(torch.cat(features, dim=-1))
        if self.frames is not None:
            tokens = tokens + self._frame_tokens(experience, steps)
        valid = experience.mask[:, steps]
        # All episodes form one sequence, so the encoder can compare trials with each other.
        encoded = self.encoder(tokens.flatten(0, 1)[None], src_key_padding_mask=~valid.flatten()[None])[0]
        pooled = (encoded * valid.flatten()[:, None]).sum(dim=0) / valid.sum().clamp(min=1)
        fingerprint = self.fingerprint(torch.cat([self.normalize(probes), policy_actions], dim=-1)).mean(dim=0)
        return self.context(torch.cat([pooled, fingerprint]))

    def _frame_tokens(self, experience: Trajectory, steps: torch.Tensor) -> torch.Tensor:
        if experience.frames is None:
            raise ValueError("this improver watches frames: collect experience with render=RenderConfig(...)")
        batch, count = experience.frames.shape[:2]
        features = self.frames(experience.frames.flatten(0, 1)).view(batch, count, -1)
        # Each token sees the latest frame rendered at or before its step.
        latest = (torch.searchsorted(experience.frame_steps.to(steps.device), steps, right=True) - 1).clamp(min=0)
        return features[:, latest]
