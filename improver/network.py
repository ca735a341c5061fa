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
    task_dim: int = 0
    """Size of the hidden task parameters (the goal) that the encoder infers from experience;
    0: no task inference. Meta-training supervises the estimate with the dataset's goals."""

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


BOUND = 3.0
"""Largest normalised goal coordinate the locator returns."""


class MonotoneDistance(nn.Module):
    """A distance that falls as the reward rises: a positive sum of softplus ramps in ``-reward``.

    Without the constraint, meta-training settles on maps that turn the geometry inside out
    (measured: distance rising with reward, held-out error 0.15 against 0.02 with the right map).
    """

    def __init__(self, ramps: int = 16) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(ramps))
        self.offset = nn.Parameter(torch.linspace(-2.0, 2.0, ramps))
        self.slope = nn.Parameter(torch.zeros(ramps))

    def forward(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[N]`` scaled rewards -> ``[N]`` non-negative distances."""
        ramps = nn.functional.softplus(self.offset - nn.functional.softplus(self.slope) * rewards[..., None])
        return ramps @ nn.functional.softplus(self.scale) / len(self.scale)


class GoalLocator(nn.Module):
    """Infers the hidden goal ``[task_dim]`` (normalised) from visited states and their rewards.

    Meta-World's ML1 tasks differ only in a goal position, and their rewards fall with the
    distance between a point of the state (the hand, the object) and that goal. Each step
    therefore gives a point ``p_i`` (a learned projection of its state), a squared distance
    ``d_i`` (a learned map of its reward and success flag) and a weight; the goal is the
    weighted least-squares solution of ``|p_i - g|^2 = d_i^2`` (trilateration, linear after
    subtracting the weighted mean), regularised toward a vote: the point of the best steps, by a
    softmax whose logits rise with the reward. Both are returned and both are supervised; the
    vote's plain signal is what steers the point projection the right way round (without it
    meta-training found a mirrored projection, held-out error 0.35 against 0.045).
    Every learned part sees one step's own inputs only: measured on the toy suite, estimates
    computed from the transformer's features memorise the few training goals (held-out error
    0.17 against 0.05).
    """

    def __init__(self, obs_dim: int, task_dim: int) -> None:
        super().__init__()
        self.point = nn.Linear(obs_dim, task_dim)
        self.distance = MonotoneDistance()
        # Logits of each step's weight in the least squares and in the vote.
        self.fit_weights = nn.Linear(obs_dim + 2, 1)
        # The vote goes to the best steps: its logits rise with the reward (and the success flag),
        # and must be able to become sharp (one step out of hundreds) within a short run.
        self.vote_slope = nn.Parameter(torch.tensor(3.0))
        self.vote_success = nn.Parameter(torch.tensor(0.0))
        self.log_ridge = nn.Parameter(torch.tensor(-3.0))

    def forward(self, obs: torch.Tensor, rewards: torch.Tensor, successes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The goal estimate and the vote, ``[2 * task_dim]``, from ``[N, obs_dim]`` normalised states, ``[N]`` scaled rewards and
        success flags, and the ``[N]`` mask of real steps."""
        signal = torch.stack([rewards, successes], dim=-1)
        points = self.point(obs)
        squared = self.distance(rewards) ** 2
        vote = self.vote_slope.exp() * rewards + self.vote_success * successes
        logits = torch.stack([self.fit_weights(torch.cat([obs, signal], dim=-1)).squeeze(-1), vote], dim=-1)
        fit, vote = logits.masked_fill(~valid[:, None], float("-inf")).softmax(dim=0).unbind(-1)
        prior = vote @ points
        centred = points - fit @ points
        norms = (points * points).sum(dim=-1) - squared
        design = 2.0 * centred
        target = norms - fit @ norms
        eye = torch.eye(points.shape[-1], dtype=points.dtype, device=points.device)
        ridge = self.log_ridge.exp()
        gram = design.T @ (fit[:, None] * design) + ridge * eye
        estimate = torch.linalg.solve(gram, design.T @ (fit * target) + ridge * prior)
        # Goals are normalised, so training goals lie within about 2 units. Visited points that
        # are nearly collinear make the solve ill-conditioned (measured: an estimate 1.7 m off on
        # a reach-v3 task); bounding it keeps such an estimate in the task's range.
        return torch.cat([BOUND * torch.tanh(estimate / BOUND), prior])


CHUNK_TOKENS = 2048
"""Most experience tokens the encoder attends over at once (see :meth:`ImprovementNet.pool`)."""


class ImprovementNet(nn.Module):
    """Encode ``(experience, policy)`` into ``z`` and predict improved actions with ``g(a | s, z)``.

    Attributes:
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
        self.register_buffer("task_mean", torch.zeros(config.task_dim))
        self.register_buffer("task_std", torch.ones(config.task_dim))
        # token: state, action, reward, success flag, time
        self.step_in = nn.Linear(config.obs_dim + config.act_dim + 3, width)
        self.frames = FrameEncoder(config.keypoints, width) if config.use_frames else None
        layer = nn.TransformerEncoderLayer(width, config.heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.fingerprint = nn.Sequential(nn.Linear(config.obs_dim + config.act_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.context = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, width))
        self.locator = GoalLocator(config.obs_dim, config.task_dim) if config.task_dim else None
        self.head = MixtureHead(config.obs_dim, config.act_dim, self.context_dim, config.components)
        self.chunk_tokens = CHUNK_TOKENS

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
        """Size of ``z``."""
        return self.config.width + 2 * self.config.task_dim

    def task_estimate(self, z: torch.Tensor) -> torch.Tensor:
        """The inferred task parameters (e.g. the goal) held in ``z``, in the task's own units."""
        return self.task_part(z)[..., 0, :] * self.task_std + self.task_mean

    def task_part(self, z: torch.Tensor) -> torch.Tensor:
        """The normalised goal estimate and vote held in ``z``, ``[..., 2, task_dim]``."""
        return z[..., self.config.width :].unflatten(-1, (2, self.config.task_dim))

    def with_task_part(self, z: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """``z`` ``[..., context_dim]`` with its goal estimate and vote replaced by ``part`` ``[..., 2, task_dim]`` (normalised)."""
        return torch.cat([z[..., : self.config.width], part.flatten(-2)], dim=-1)

    def aimed(self, z: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """``z`` with its goal estimate and vote moved by ``offset`` ``[task_dim]`` (in the task's own units)."""
        if not self.config.task_dim:
            raise ValueError("this improver infers no goal (task_dim 0): there is nothing to aim elsewhere")
        shift = (offset.to(z) / self.task_std).repeat(2)
        return torch.cat([z[..., : self.config.width], z[..., self.config.width :] + shift], dim=-1)

    def encode(self, experience: Trajectory, policy_actions: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
        """Context ``z`` ``[context_dim]`` from one batch of episodes and the policy's actions on ``probes``.

        ``z`` is a learned summary followed, with ``task_dim``, by the normalised goal estimate and
        vote of the ``GoalLocator``.
        """
        steps, obs, actions, rewards, successes, valid = self._token_inputs(experience)
        time = (steps.to(obs.dtype) / max(1, experience.observations.shape[1]))[None, :, None].expand(obs.shape[0], -1, 1)
        tokens = self.step_in(torch.cat([obs, actions, rewards[..., None], successes[..., None], time], dim=-1))
        if self.frames is not None:
            tokens = tokens + self._frame_tokens(experience, steps)
        pooled = self.pool(tokens, valid)
        fingerprint = self.fingerprint(torch.cat([self.normalize(probes), policy_actions], dim=-1)).mean(dim=0)
        z = self.context(torch.cat([pooled, fingerprint]))
        if not self.config.task_dim:
            return z
        return torch.cat([z, self.locate(experience)])

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

    def locate(self, experience: Trajectory) -> torch.Tensor:
        """The ``GoalLocator``'s normalised goal estimate and vote ``[2 * task_dim]`` from one batch of episodes."""
        _, obs, _, rewards, successes, valid = self._token_inputs(experience)
        return self.locator(obs.flatten(0, 1), rewards.flatten(), successes.flatten(), valid.flatten())

    def success_points(self, experience: Trajectory) -> torch.Tensor:
        """The locator's points ``[M, task_dim]`` (normalised) at the token steps whose success flag is set."""
        _, obs, _, _, successes, valid = self._token_inputs(experience)
        return self.locator.point(obs[(successes > 0) & valid])

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
