"""The Watch-Try-Learn-style improvement network.

It watches a lesser policy's experience (states, actions, rewards, success flags, optionally
frames) and the policy itself (through a fingerprint: its actions on probe states), summarises
them into a context ``z``, and predicts better behaviour ``g(a | s, z)`` as a Gaussian mixture.
With task inference, ``z`` ends with a belief about the hidden task (:mod:`improver.task_inference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .task_inference import DEFAULT_TASK_INFERENCE, TASK_INFERENCE_NAMES, TaskInference, TaskInferenceName, make_task_inference
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
    task_dim: int = 0
    """Number of hidden task parameters that task inference estimates from experience; 0: no task
    inference. Meta-training supervises the estimate with the dataset's task parameters."""
    task_inference: TaskInferenceName = DEFAULT_TASK_INFERENCE
    """Which task inference (:func:`improver.task_inference.make_task_inference`) appends its belief to ``z``."""

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name) for name in ("obs_dim", "act_dim", "width", "layers", "heads", "token_stride", "probes", "components", "keypoints")}
        for name, value in {**sizes, "task_dim": self.task_dim}.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"NetworkConfig.{name} must be an integer; got {value!r}")
        bad = {name: value for name, value in sizes.items() if value < 1}
        if bad or self.task_dim < 0:
            raise ValueError(f"NetworkConfig sizes must be positive (task_dim 0 or more); got {bad or {'task_dim': self.task_dim}}")
        if self.width % self.heads:
            raise ValueError(f"NetworkConfig.width ({self.width}) must be a multiple of heads ({self.heads})")
        if self.task_inference not in TASK_INFERENCE_NAMES:
            raise ValueError(f"NetworkConfig.task_inference must be one of {list(TASK_INFERENCE_NAMES)}; got {self.task_inference!r}")


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

    def imitation_loss(self, obs: torch.Tensor, z: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean negative log-likelihood of ``actions`` ``[N, act]`` and the squared error of :meth:`act`.

        The likelihood alone does not make the most likely component's mean the right action.
        """
        return -self.log_prob(obs, z, actions).mean(), nn.functional.mse_loss(self.act(obs, z), actions)

    def act(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The mean of the most likely component, clipped to ``[-1, 1]``: a deterministic improved action."""
        means, _, logits = self(obs, z)
        best = logits.argmax(dim=-1, keepdim=True)
        return means.gather(-2, best.unsqueeze(-1).expand(*best.shape, means.shape[-1])).squeeze(-2).clamp(-1.0, 1.0)


CHUNK_TOKENS = 2048
"""Most experience tokens the encoder attends over at once (see :meth:`ImprovementNet.pool`)."""


OLD_KEYS = {"task_mean": "task_inference.task_mean", "task_std": "task_inference.task_std", "locator.": "task_inference."}
"""State-dict keys (and key prefixes) of checkpoints written before task inference had one interface, and their names now."""


def _rename_old_keys(net: ImprovementNet, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
    """Load hook: read a state dict written before task inference had one interface (the shipped
    improvers') under the keys of now (:data:`OLD_KEYS`)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        old = next((o for o in OLD_KEYS if name == o or (o.endswith(".") and name.startswith(o))), None)
        if old is None:
            continue
        value = state_dict.pop(key)
        # Without task inference the old buffers were empty: there is nothing to keep.
        if net.task_inference is not None or value.numel():
            state_dict[prefix + OLD_KEYS[old] + name[len(old) :]] = value


class ImprovementNet(nn.Module):
    """Encode ``(experience, policy)`` into ``z`` and predict improved actions with ``g(a | s, z)``.

    ``z`` ``[context_dim]`` is a learned summary ``[width]`` followed, with ``task_dim``, by the
    belief ``[belief_dim]`` of :attr:`task_inference`, which the network never looks into.

    Attributes:
        task_inference: The task inference (``None`` with ``task_dim`` 0).
        chunk_tokens: Most experience tokens the encoder attends over at once (default
            ``CHUNK_TOKENS``); not saved with the weights, since it changes no weight.
    """

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
        self.task_inference: TaskInference | None = (
            make_task_inference(config.task_inference, config.obs_dim, config.task_dim, width, config.heads) if config.task_dim else None
        )
        self.head = MixtureHead(config.obs_dim, config.act_dim, self.context_dim, config.components)
        self.chunk_tokens = CHUNK_TOKENS
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """Observations scaled by the meta-training data's statistics."""
        return (obs - self.obs_mean) / self.obs_std

    def token_steps(self, steps: int) -> torch.Tensor:
        """Step indices that become tokens."""
        return torch.arange(0, steps, self.config.token_stride)

    def probe_index(self, count: int) -> torch.Tensor:
        """Indices of ``config.probes`` probe points spread evenly over ``count`` candidates."""
        return torch.linspace(0, count - 1, self.config.probes).round().long()

    @property
    def context_dim(self) -> int:
        """Size of ``z``: the width plus the task inference's belief."""
        return self.config.width + (self.task_inference.belief_dim if self.task_inference is not None else 0)

    def belief(self, z: torch.Tensor) -> torch.Tensor:
        """The task inference's belief ``[..., belief_dim]`` held in ``z`` ``[..., context_dim]``."""
        return z[..., self.config.width :]

    def with_belief(self, z: torch.Tensor, belief: torch.Tensor) -> torch.Tensor:
        """``z`` ``[..., context_dim]`` with its belief replaced by ``belief`` ``[..., belief_dim]``."""
        return torch.cat([z[..., : self.config.width], belief], dim=-1)

    def shifted(self, z: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """``z`` with its belief moved by ``offset`` ``[task_dim]`` (the task parameters' own units)."""
        return self.with_belief(z, self._inference().shifted(self.belief(z), offset))

    def task_estimate(self, z: torch.Tensor) -> torch.Tensor:
        """The task parameters ``[..., task_dim]`` that ``z`` holds, in their own units."""
        return self._inference().estimate(self.belief(z))

    def _inference(self) -> TaskInference:
        if self.task_inference is None:
            raise ValueError("this improver infers no task (task_dim 0): its z holds no belief about the task")
        return self.task_inference

    def encode(self, experience: Trajectory, policy_actions: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
        """Context ``z`` ``[context_dim]`` from one batch of episodes and the policy's actions on ``probes``."""
        steps, obs, actions, rewards, successes, valid = self._token_inputs(experience)
        time = (steps.to(obs.dtype) / max(1, experience.observations.shape[1]))[None, :, None].expand(obs.shape[0], -1, 1)
        tokens = self.step_in(torch.cat([obs, actions, rewards[..., None], successes[..., None], time], dim=-1))
        if self.frames is not None:
            tokens = tokens + self._frame_tokens(experience, steps)
        pooled = self.pool(tokens, valid)
        fingerprint = self.fingerprint(torch.cat([self.normalize(probes), policy_actions], dim=-1)).mean(dim=0)
        z = self.context(torch.cat([pooled, fingerprint]))
        if self.task_inference is None:
            return z
        return torch.cat([z, self.infer_task(experience)])

    def pool(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean encoder feature ``[width]`` over the real tokens of ``tokens`` ``[B, S, width]`` (``valid`` ``[B, S]``).

        The episodes' tokens form one sequence, so the encoder can compare trials with each
        other; but attention over it costs the square of its length. So the encoder attends within
        chunks of whole consecutive episodes of at most ``chunk_tokens`` tokens (one episode if it
        is longer), and the mean is taken over all chunks: time and memory grow linearly with the
        episodes (``improver bench step``, push-v3, one thread: a behaviour step on 200 episodes of
        500 steps took 21 s and 3.9 GB as one sequence, 3.2 s and 0.9 GB in chunks; its actions
        moved by 1e-5). The shipped improvers were trained on at most about 1,500 tokens
        (10 episodes of 500 steps, memory 3): one chunk, exactly the single-sequence encoder.
        """
        per_chunk = max(1, self.chunk_tokens // tokens.shape[1])
        sums = []
        for part, real in zip(tokens.split(per_chunk), valid.split(per_chunk)):
            encoded = self.encoder(part.flatten(0, 1)[None], src_key_padding_mask=~real.flatten()[None])[0]
            sums.append((encoded * real.flatten()[:, None]).sum(dim=0))
        return torch.stack(sums).sum(dim=0) / valid.sum().clamp(min=1)

    def infer_task(self, experience: Trajectory) -> torch.Tensor:
        """The task inference's belief ``[belief_dim]`` from one batch of episodes."""
        return self._inference().infer(*self.task_inputs(experience))

    def task_inputs(self, experience: Trajectory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What task inference reads at the token steps of one batch of episodes, flattened over them:
        normalised states ``[N, obs_dim]``, scaled rewards, success flags and the mask of real steps (``[N]`` each)."""
        _, obs, _, rewards, successes, valid = self._token_inputs(experience)
        return obs.flatten(0, 1), rewards.flatten(), successes.flatten(), valid.flatten()

    def _token_inputs(self, experience: Trajectory) -> tuple[torch.Tensor, ...]:
        """Token step indices and, at those steps ``[B, S]``: normalised states (``[B, S, obs_dim]``),
        actions (``[B, S, act_dim]``), scaled rewards (zero if missing), success flags and the mask
        of real steps.

        Padding steps may hold anything (NaN, 1e30): they are read as zeros, since a masked-out
        token still passes through the network and ``0 * NaN`` would spread into the mean.
        """
        steps = self.token_steps(experience.observations.shape[1]).to(experience.observations.device)
        valid = experience.mask[:, steps]

        def real(values: torch.Tensor) -> torch.Tensor:
            return torch.where(valid.view(*valid.shape, *(1,) * (values.ndim - 2)), values[:, steps], 0)

        obs = self.normalize(real(experience.observations))
        rewards = real(experience.rewards) / self.reward_scale if experience.rewards is not None else torch.zeros_like(valid, dtype=obs.dtype)
        return steps, obs, real(experience.actions), rewards, real(experience.successes).to(obs.dtype), valid

    def _frame_tokens(self, experience: Trajectory, steps: torch.Tensor) -> torch.Tensor:
        if experience.frames is None:
            raise ValueError("this improver watches frames: collect experience with render=RenderConfig(...)")
        batch, count = experience.frames.shape[:2]
        features = self.frames(experience.frames.flatten(0, 1)).view(batch, count, -1)
        # Each token sees the latest frame rendered at or before its step.
        latest = (torch.searchsorted(experience.frame_steps.to(steps.device), steps, right=True) - 1).clamp(min=0)
        return features[:, latest]
