"""``Improver``: the learned policy-improvement operator, applied like an RL update.

    policy = improver.step(policy, experience)
"""

from __future__ import annotations

import copy
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import higher
import torch
from torch import nn

from .augment.ranking_reward import load_reward_model, save_reward_model
from .distill import fit_policy
from .loop_settings import LoopSettings
from .io import FolderKind, atomic_path
from .network import ImprovementNet, NetworkConfig
from .policies import placement
from .saved_files import check_keys, load_weights, read_json_object, write_weights
from .types import VALUE_LIMIT, Trajectory

FORMAT_VERSION = 1
CONFIG_KEYS = ("format_version", "network", "distill_steps")
OPTIONAL_CONFIG_KEYS = ("fit_epochs", "reward_free", "aim_offset", "loop_settings", "versions", "metadata")


PolicyInputs = Literal["observations", "frames"]


def policy_inputs_of(experience: Trajectory, inputs: PolicyInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The experience's real steps as ``(states [N, obs_dim], what the policy reads [N, ...])``.

    For ``"frames"`` only the rendered steps count, and frames become floats in ``[0, 1]``.
    """
    if inputs == "observations":
        states = experience.observations[experience.mask]
        return states, states
    if inputs != "frames":
        raise ValueError(f"inputs must be 'observations' or 'frames'; got {inputs!r}")
    if experience.frames is None:
        raise ValueError("a pixel policy needs frames: collect the experience with render=RenderConfig(...)")
    rendered = experience.frame_steps[None, :] < experience.lengths[:, None]  # [B, F]
    steps = experience.frame_steps.expand_as(rendered)[rendered]
    episodes = torch.arange(experience.num_episodes)[:, None].expand_as(rendered)[rendered]
    return experience.observations[episodes, steps], experience.frames[rendered].float() / 255.0


def bounded(grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Gradients scaled down to a total norm of at most 1 (a distillation step's direction).

    A policy fed raw, large observations has a steep loss: plain steps at the meta-learned sizes
    diverge on it, and the unrolled divergence sends meta-gradients of 1e5 (measured on reach-v3).
    """
    norm = torch.sqrt(sum((g * g).sum() for g in grads if g is not None))
    scale = 1.0 / norm.clamp(min=1.0)
    return [None if g is None else g * scale for g in grads]


@contextmanager
def evaluating(policy: Any) -> Iterator[None]:
    """Run ``policy`` in eval mode, then give each of its submodules back its own training flag.

    Looking at a policy must not change it: in train mode a BatchNorm layer would update its
    running statistics (and refuse a batch of one).
    """
    if not isinstance(policy, nn.Module):
        yield
        return
    flags = [(module, module.training) for module in policy.modules()]
    policy.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def checked(improved: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """``improved``, once its weights and its actions on ``inputs`` (``[N, ...]``, what it reads) are all finite.

    Raises:
        FloatingPointError: naming the non-finite weights, or saying the actions are.
    """
    weights = [name for name, value in improved.state_dict().items() if value.is_floating_point() and not bool(value.isfinite().all())]
    device, dtype = placement(improved)
    with torch.no_grad():  # in batches: the experience may hold hundreds of thousands of states
        finite = all(bool(improved(part.to(device, dtype)).isfinite().all()) for part in inputs.split(4096))
    if weights or not finite:
        what = f"weights ({', '.join(weights[:5])})" if weights else "actions on the experience's states"
        raise FloatingPointError(
            f"the improvement step produced NaN or infinite {what}; the input policy is unchanged. The policy or the "
            "experience drove the improver out of its range: check their values, or use the other mode"
        )
    return improved


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

    def shifted(self, offset: torch.Tensor) -> BehaviourPolicy:
        """The same behaviour acting on the inferred task moved by ``offset`` ``[task_dim]`` (the task
        parameters' own units); shares the network."""
        return BehaviourPolicy(self.net, self.net.shifted(self.z, offset)).eval()


class Improver(nn.Module):
    """Watches a policy's experience and returns a better policy.

    Args:
        config: Network sizes (observation and action size of the task family).
        distill_steps: Supervised steps that move a copy of the user's policy toward ``g``.
        fit_epochs: If above 0, parameters mode instead fits the copy to ``g``'s actions with Adam
            for this many epochs: for an improver meta-trained without the distillation loss,
            whose step sizes were never trained.
        reward_free: Meta-trained on the rewards of its ranking reward model (``reward_model``,
            attach one before use): every step scores the experience with that model, whether or
            not the experience carries the environment's rewards, so the scale it learned holds.
        aim_offset: ``[task_dim]`` added to every inferred task (in the task parameters' own units),
            e.g. as :func:`improver.refine.calibrate_aim` chose it on the training tasks; ``None``: zeros.
        loop_settings: The improvement loop's settings this improver is meant to be used with
            (saved with it; the defaults of ``improve`` and the commands); ``None``: a bare
            improver's (parameters mode, no exploration).
    """

    def __init__(
        self, config: NetworkConfig, distill_steps: int = 20, fit_epochs: int = 0, reward_free: bool = False, aim_offset: Sequence[float] | None = None,
        loop_settings: LoopSettings | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("distill_steps", distill_steps), ("fit_epochs", fit_epochs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer, 0 or more; got {value!r}")
        if not isinstance(reward_free, bool):
            raise ValueError(f"reward_free must be true or false; got {reward_free!r}")
        if aim_offset is not None and (
            len(aim_offset) != config.task_dim or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in aim_offset)
        ):
            raise ValueError(f"aim_offset needs one finite number per task parameter ({config.task_dim}); got {aim_offset!r}")
        loop_settings = LoopSettings() if loop_settings is None else loop_settings
        if not isinstance(loop_settings, LoopSettings):
            raise TypeError(f"loop_settings must be an improver.loop_settings.LoopSettings; got {type(loop_settings).__name__}")
        if (loop_settings.task_exploration or loop_settings.wide_task_exploration) and not config.task_dim:
            raise ValueError("loop_settings with task exploration need an improver that infers the task (task_dim > 0)")
        self.loop_settings = loop_settings
        self.config = config
        self.fit_epochs = fit_epochs
        self.reward_free = reward_free
        self.aim_offset = tuple(float(v) for v in aim_offset) if aim_offset is not None else (0.0,) * config.task_dim
        self.net = ImprovementNet(config)
        # Meta-learned: a step size per distillation step and the strength of the trust region.
        self.log_lrs = nn.Parameter(torch.full((distill_steps,), math.log(0.1)))
        self.log_trust = nn.Parameter(torch.tensor(math.log(1e-3)))
        self.reward_model: nn.Module | None = None

    @property
    def distill_steps(self) -> int:
        """Number of distillation steps in parameters mode."""
        return self.log_lrs.numel()

    def _check(self, policy: nn.Module | Any, experience: Trajectory, inputs: str) -> Trajectory:
        obs_dim, act_dim = self.config.obs_dim, self.config.act_dim
        if not isinstance(experience, Trajectory):
            raise TypeError(f"experience must be a Trajectory (from improver.tasks.rollout); got {type(experience).__name__}")
        if experience.observations.shape[-1] != obs_dim:
            raise ValueError(f"this improver was trained on {obs_dim}-d observations; the experience has {experience.observations.shape[-1]}")
        if experience.actions.shape[-1] != act_dim:
            raise ValueError(f"this improver was trained on {act_dim}-d actions; the experience has {experience.actions.shape[-1]}")
        _, policy_inputs = policy_inputs_of(experience, inputs)
        device, dtype = placement(policy)
        with torch.no_grad(), evaluating(policy):
            out = policy(policy_inputs[:1].to(device, dtype))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, act_dim):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the policy must map a batch of {inputs} to [B, {act_dim}] actions; for a batch of 1 it returned {shape} "
                "(recurrent policies are not supported; wrap an SB3 policy in improver.integrations.sb3.SB3Actor)"
            )
        return self.scored(experience)

    def scored(self, experience: Trajectory) -> Trajectory:
        """``experience`` with the rewards this improver reads: the ranking reward model's if the
        experience has none or the improver is ``reward_free``, else the environment's."""
        if experience.rewards is not None and not self.reward_free:
            return experience
        if self.reward_model is None:
            why = "this improver was meta-trained reward-free" if self.reward_free else "the experience has no rewards"
            raise ValueError(f"{why} and it has no ranking reward model to supply them (attach one as improver.reward_model)")
        device = next(self.reward_model.parameters()).device
        return replace(experience, rewards=self.reward_model.predict(experience.to(device)).to(experience.observations))

    def context(self, policy: nn.Module, experience: Trajectory, inputs: PolicyInputs = "observations") -> torch.Tensor:
        """Context ``z`` ``[context_dim]`` summarising the policy (acting on ``inputs``) and its experience
        (with ``aim_offset`` added to the task it infers). The policy runs in eval mode and is left as it was."""
        device = self.log_lrs.device
        experience = experience.to(device)
        states, policy_inputs = policy_inputs_of(experience, inputs)
        probes = self.net.probe_index(len(states))
        policy_device, policy_dtype = placement(policy)
        with torch.no_grad(), evaluating(policy):
            actions = policy(policy_inputs[probes].to(policy_device, policy_dtype)).to(device, torch.float32)
        if not bool((actions.abs() <= VALUE_LIMIT).all()):
            raise ValueError(f"the policy returned NaN, infinite or huge (beyond +-{VALUE_LIMIT:g}) actions on the experience's states; fix the policy first")
        z = self.net.encode(experience, actions, states[probes])
        return self.net.shifted(z, torch.tensor(self.aim_offset)) if any(self.aim_offset) else z

    def step(
        self,
        policy: nn.Module,
        experience: Trajectory,
        mode: Literal["parameters", "behaviour"] = "parameters",
        inputs: PolicyInputs = "observations",
        extra_states: torch.Tensor | None = None,
    ) -> nn.Module:
        """One improvement step. The input policy is never modified (it is looked at in eval mode).

        Works under ``torch.no_grad()`` and ``torch.inference_mode()`` too.

        Args:
            policy: The current policy: any ``nn.Module`` mapping a batch of its inputs to
                ``[B, act_dim]`` actions (in behaviour mode also a plain function). Parameters
                mode leaves parameters with ``requires_grad=False`` as they are, unless all of them
                are (a policy frozen for inference): then it distils them all, and the copy keeps
                the flags.
            experience: Episodes collected with ``policy``; rewards may be missing if this improver
                carries a ranking reward model.
            mode: ``"parameters"``: a copy of ``policy`` (same class and architecture) distilled
                toward the improved behaviour; ``"behaviour"``: a module acting with ``g`` and ``z``
                on observations.
            inputs: What the policy reads: ``"observations"`` ``[B, obs_dim]``, or ``"frames"``
                (a pixel policy): float ``[B, 3, H, W]`` in ``[0, 1]``, from the experience's frames.
            extra_states: Parameters mode, ``inputs="observations"`` only: ``[N, obs_dim]`` more
                states to fit the copy on, labelled with the improved behaviour like the
                experience's own. The improvement loop passes every state its earlier steps'
                policies visited (DAgger: a fit on the lesser policy's states alone drifts off
                them where the improved behaviour goes).

        Returns:
            The improved policy.

        Raises:
            FloatingPointError: the improved policy has NaN or infinite weights or actions on the
                experience's states (it is not returned).
        """
        if mode not in ("parameters", "behaviour"):
            raise ValueError(f"mode must be 'parameters' or 'behaviour'; got {mode!r}")
        if mode == "parameters" and not (isinstance(policy, nn.Module) and any(True for _ in policy.parameters())):
            raise TypeError(
                f"parameters mode distils into the policy's own parameters, so it needs an nn.Module with parameters; "
                f"got a {type(policy).__name__} without any: use mode='behaviour'"
            )
        if extra_states is not None:
            if mode != "parameters" or inputs != "observations":
                raise ValueError("extra_states are fitted on in parameters mode on observations only")
            if not isinstance(extra_states, torch.Tensor) or extra_states.ndim != 2 or extra_states.shape[-1] != self.config.obs_dim:
                shape = tuple(extra_states.shape) if isinstance(extra_states, torch.Tensor) else type(extra_states).__name__
                raise ValueError(f"extra_states must be an [N, {self.config.obs_dim}] tensor of observations; got {shape}")
        # Distillation needs autograd, which inference mode turns off; tensors made in it are read only.
        with torch.inference_mode(False):
            experience = self._check(policy, experience, inputs)
            with torch.no_grad():
                z = self.context(policy, experience, inputs)
            states, policy_inputs = policy_inputs_of(experience.to(self.log_lrs.device), inputs)
            if mode == "behaviour":
                return checked(BehaviourPolicy(copy.deepcopy(self.net), z).eval(), states)
            if extra_states is not None:
                states = policy_inputs = torch.cat([states, extra_states.to(states)])
            with torch.no_grad():
                targets = self.net.head.act(self.net.normalize(states), z)
            return self._fitted(policy, policy_inputs, targets)

    def fit_to(self, policy: nn.Module, behaviour: nn.Module, states: torch.Tensor) -> nn.Module:
        """A copy of ``policy`` moved toward ``behaviour``'s actions on ``states`` ``[N, obs_dim]``
        (observations), by this improver's rule of parameters mode; the policy is never modified.

        ``step(policy, experience, extra_states=extra)`` is ``fit_to(policy, step(policy, experience,
        mode="behaviour"), states)`` with ``states`` the experience's followed by ``extra``: the
        improvement loop calls it so that one context serves both its teacher and the copy.
        """
        with torch.inference_mode(False):
            states = states.to(self.log_lrs.device)
            with torch.no_grad():
                targets = behaviour(states)
            return self._fitted(policy, states, targets)

    def _fitted(self, policy: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> nn.Module:
        """A checked copy of ``policy`` fitted to ``targets`` ``[N, act_dim]`` on ``inputs`` (Adam for
        ``fit_epochs``, else the meta-learned distillation)."""
        improved = copy.deepcopy(policy)
        frozen = not any(p.requires_grad for p in improved.parameters())
        if frozen:
            improved.requires_grad_(True)
        if self.fit_epochs:
            with torch.enable_grad():  # also when the caller runs step() under torch.no_grad()
                improved = fit_policy(improved, inputs, targets, epochs=self.fit_epochs, generator=torch.Generator().manual_seed(0))
        else:
            improved = self.distill(improved, inputs, targets, differentiable=False).eval()
        return checked(improved.requires_grad_(False) if frozen else improved, inputs)

    def distill(
        self, policy: nn.Module, states: torch.Tensor, targets: torch.Tensor, differentiable: bool, probe: torch.Tensor | None = None
    ) -> Any:
        """Move ``policy`` toward ``targets`` on ``states`` with the meta-learned steps and trust region.

        With ``differentiable`` the steps are traced by ``higher`` on a functional copy, so that a
        loss on the result trains the step sizes, the trust region and ``g``; the distilled
        policy's actions on ``probe`` are returned. Otherwise ``policy`` itself is updated in place
        (pass a copy) with the same rule and returned; that path needs no ``higher``, which cannot
        patch every module class (stable-baselines3's ABC-based policies, for one).
        """
        device, dtype = placement(policy)
        states, targets = states.to(device, dtype), targets.to(device, dtype)
        start = [p.detach().clone() for p in policy.parameters()]
        lrs, trust = self.log_lrs.exp().to(dtype), self.log_trust.exp().to(dtype)

        def objective(actions: torch.Tensor, parameters: Any) -> torch.Tensor:
            drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(parameters, start))
            return nn.functional.mse_loss(actions, targets) + trust * drift

        if differentiable:
            optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
            with higher.innerloop_ctx(policy, optimizer, copy_initial_weights=True) as (fmodel, diffopt):
                for k in range(self.distill_steps):
                    diffopt.step(objective(fmodel(states), fmodel.parameters()), override={"lr": [lrs[k]]}, grad_callback=bounded)

                return fmodel(probe.to(device, dtype))
        parameters = list(policy.parameters())
        # Frozen parameters (requires_grad False) are the user's choice: they stay as they are.
        trainable = [p for p in parameters if p.requires_grad]
        if not trainable:
            raise ValueError("the policy has no parameter with requires_grad=True: there is nothing to distil into")
        lrs, trust = lrs.detach(), trust.detach()
        # Distillation needs gradients even when the caller runs step() under torch.no_grad().
        with torch.enable_grad():
            for k in range(self.distill_steps):
                grads = bounded(torch.autograd.grad(objective(policy(states), parameters), trainable, allow_unused=True))
                with torch.no_grad():
                    for parameter, grad in zip(trainable, grads):
                        if grad is not None:
                            parameter -= lrs[k] * grad
        return policy

    def save_pretrained(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (with versions) to the folder ``path``, atomically.

        A ranking reward model, if attached, is written to ``path/reward_model``.
        """
        config = {
            "format_version": FORMAT_VERSION,
            "network": asdict(self.config),
            "distill_steps": self.distill_steps,
            "fit_epochs": self.fit_epochs,
            "reward_free": self.reward_free,
            "aim_offset": list(self.aim_offset),
            "loop_settings": asdict(self.loop_settings),
            "versions": {p: version(p) for p in ("policy-improver", "torch")},
            "metadata": metadata or {},
        }
        kind = FolderKind("improver checkpoint", frozenset(CONFIG_KEYS), optional={"reward_model"})
        with atomic_path(path, kind) as tmp:
            tmp.mkdir()
            write_weights({k: v for k, v in self.state_dict().items() if not k.startswith("reward_model.")}, tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            if self.reward_model is not None:
                save_reward_model(self.reward_model, tmp / "reward_model")
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Improver:
        """Load an improver written by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: ``path`` is not an improver checkpoint folder.
            ValueError: a file of the checkpoint is damaged, of another format or does not fit.
        """
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not an improver checkpoint: it needs config.json and model.safetensors")
        config = read_json_object(path / "config.json")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: improver checkpoint format {config.get('format_version')!r}; this version reads {FORMAT_VERSION}")
        check_keys(config, path / "config.json", CONFIG_KEYS, OPTIONAL_CONFIG_KEYS)
        try:
            improver = cls(
                NetworkConfig(**config["network"]), config["distill_steps"], config.get("fit_epochs", 0), config.get("reward_free", False),
                config.get("aim_offset"), LoopSettings.from_record(config.get("loop_settings", {}), path / "config.json"),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path / 'config.json'} describes no valid improver: {err}") from err
        load_weights(improver, path / "model.safetensors")
        if (path / "reward_model").is_dir():
            improver.reward_model = load_reward_model(path / "reward_model")
        return improver.eval()
