"""Meta-training of the improver on an improvement dataset: the only module that knows Accelerate.

Loss per example: the behaviour head's negative log-likelihood of the better actions (the
expert's on the lesser policy's states, and the better episodes' own), plus the error of the
lesser policy after it has been distilled toward ``g``, differentiated through the distillation
steps with ``higher``. One code path for CPU, one GPU and several processes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from improver.augment.dataset import Example, ImprovementDataset
from improver.augment.noise import derive_seed
from improver.types import Trajectory

from .loop import heldout_success
from .operator import Improver


@dataclass(frozen=True)
class MetaTrainConfig:
    """Settings of a meta-training run."""

    steps: int = 300
    """Optimiser steps."""
    batch_size: int = 8
    """Examples per step (over all processes)."""
    lr: float = 1e-3
    """Adam learning rate."""
    distill_weight: float = 1.0
    """Weight of the distilled policy's error against the behaviour head's likelihood."""
    task_weight: float = 1.0
    """Weight of the task-inference error (the goal estimate against the episode's true goal)."""
    task_lr: float = 1e-2
    """Adam learning rate of the goal locator: a few dozen parameters fed by one loss, which
    need about 3000 steps at this rate (measured on the toy suite)."""
    goal_forcing: float | None = 0.1
    """With task inference: the head learns from the true goal plus noise of this size (in
    normalised units) in place of the estimate, so it learns to act on a goal while the estimate
    is still poor; None: from the estimate."""
    grad_clip: float = 1.0
    """Largest gradient norm: a mixture likelihood can spike on an outlying target action."""
    distill_states: int = 256
    """States sampled per example for the differentiable distillation."""
    checkpoint_every: int = 50
    """Steps between checkpoints (``accelerator.save_state``)."""
    validate_every: int = 0
    """Steps between held-out validations (0: only at the end); needs a validation dataset."""
    locate_ranked: bool = True
    """With task inference: the locator also learns to locate each task's goal from the task's
    noise-ladder episodes (see :func:`example_loss`)."""
    seed: int = 0
    """Seed of the example order and state sampling."""


class _Progress:
    """The step counter, saved and restored with the accelerator's state."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]


def fit_normalization(improver: Improver, dataset: ImprovementDataset) -> None:
    """Set the network's observation and reward scales from the dataset's episodes."""
    observations, rewards, goals = [], [], []
    for i in range(len(dataset)):
        example = _scored(improver, dataset.example(i))
        observations += [example.lesser.observations[example.lesser.mask], example.better.observations[example.better.mask]]
        rewards.append(example.lesser.rewards[example.lesser.mask])
        goals.append(task_target(example))
    states = torch.cat(observations)
    net = improver.net
    net.obs_mean.copy_(states.mean(dim=0))
    net.obs_std.copy_(states.std(dim=0).clamp(min=1e-3))
    net.reward_scale.copy_(torch.cat(rewards).abs().max().clamp(min=1e-6))
    if net.config.task_dim:
        goals = torch.stack(goals)
        if goals.shape[-1] != net.config.task_dim:
            raise ValueError(f"the network infers {net.config.task_dim} task parameters; the dataset's goals have {goals.shape[-1]}")
        net.task_mean.copy_(goals.mean(dim=0))
        # One scale for every axis: the locator's trilateration needs distances to keep their
        # geometry, and a near-constant coordinate (a table's height) must not become noise.
        net.task_std.fill_(goals.std(dim=0).mean().clamp(min=1e-2))


def _scored(improver: Improver, example: Example) -> Example:
    """``example`` whose lesser experience carries the rewards the improver reads at a step."""
    return example._replace(lesser=improver.scored(example.lesser)) if improver.reward_free else example


def _ladders(improver: Improver, dataset: ImprovementDataset) -> dict[int, Trajectory]:
    """Each task's noise-ladder episodes, with the rewards the improver reads, by task index."""
    ranked, _ = dataset.ranked()
    if improver.reward_free:
        ranked = improver.scored(ranked)
    indices = torch.tensor([info.index for info in ranked.tasks])
    return {int(k): ranked.take(indices == k) for k in indices.unique()}


def task_target(example: Example) -> torch.Tensor:
    """The hidden task parameters of an example: its episodes' goal."""
    return torch.tensor(example.lesser.tasks[0].goal, dtype=torch.float32)


def normalized_goal(net: nn.Module, experience: Trajectory) -> torch.Tensor:
    """The goal of ``experience``'s (first) task in the network's normalised units."""
    return (torch.tensor(experience.tasks[0].goal).to(net.task_std) - net.task_mean) / net.task_std


def locate_error(net: nn.Module, experience: Trajectory) -> torch.Tensor:
    """Squared error of the goal locator's estimate and vote from ``experience`` (one task's episodes), normalised units."""
    located = net.locate(experience).unflatten(-1, (2, -1))
    return nn.functional.mse_loss(located, normalized_goal(net, experience).expand(2, -1))


def example_loss(
    improver: Improver, example: Example, config: MetaTrainConfig, generator: torch.Generator, locate_also: Trajectory | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Meta-training loss of one example, and its parts.

    ``locate_also``: more episodes of the example's task (its noise ladder) that the goal locator
    must also locate the goal from. A lesser policy's own episodes can say little about the goal
    (push-v3 zoo policies rarely touch the puck), while the policies after a step push it around:
    trained on the lesser episodes alone, the locator answered about the goals' mean after a
    step too. Measured on push-v3 held-out goals: with the ladders it uses the episodes after a
    step on some goals (one: 14.7 cm off from the lesser episodes, 1.5 cm from the step-1
    episodes), not yet on most (success after 3 steps 0.34 against 0.33).
    """
    device = improver.log_lrs.device
    net = improver.net
    lesser, better = example.lesser.to(device), example.better.to(device)
    policy = example.policy.to(device)
    real = lesser.observations[lesser.mask]
    probes = real[net.probe_index(len(real))]
    with torch.no_grad():
        probe_actions = policy(probes)
    z = net.encode(lesser, probe_actions, probes)
    task = torch.zeros((), device=device)
    if net.config.task_dim:
        truth = normalized_goal(net, lesser)
        task = nn.functional.mse_loss(net.task_part(z), truth.expand(2, -1))
        if locate_also is not None:
            task = (task + locate_error(net, locate_also.to(device))) / 2
        if config.goal_forcing is not None:
            noise = config.goal_forcing * torch.randn((2, *truth.shape), generator=generator).to(device)
            z = net.with_task_part(z, truth + noise)
    states = torch.cat([lesser.observations[lesser.mask], better.observations[better.mask]])
    targets = torch.cat([example.target_actions.to(device)[lesser.mask], better.actions[better.mask]])
    nll, mode = net.head.imitation_loss(net.normalize(states), z, targets)
    distill = torch.zeros((), device=device)
    if config.distill_weight > 0:
        lesser_states = lesser.observations[lesser.mask]
        pick = torch.randperm(len(lesser_states), generator=generator)[:config.distill_states].to(device)
        check = torch.randperm(len(states), generator=generator)[:config.distill_states].to(device)
        distilled = improver.distill(
            policy, lesser_states[pick], net.head.act(net.normalize(lesser_states[pick]), z), differentiable=True, probe=states[check]
        )
        distill = nn.functional.mse_loss(distilled, targets[check])
    loss = nll + mode + config.distill_weight * distill + config.task_weight * task
    return loss, {"nll": nll.item(), "mode_mse": mode.item(), "distill_mse": distill.item(), "task_mse": task.item()}


def meta_train(
    improver: Improver,
    dataset: ImprovementDataset,
    config: MetaTrainConfig,
    out: str | Path,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    validation: ImprovementDataset | None = None,
) -> Improver:
    """Meta-train ``improver`` on ``dataset``; checkpoints in ``out/checkpoints``, TensorBoard logs in ``out``.

    A run whose ``out`` already holds a checkpoint resumes from it and ends where an
    uninterrupted run would have. With a ``validation`` dataset of held-out tasks, the success
    of its lesser policies after one ``step`` is measured (in the environment) and logged as
    ``val/success_before`` and ``val/success_after``. Returns the trained improver (also
    written to ``out/improver``).
    """
    out = Path(out)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available(), log_with="tensorboard", project_dir=out)
    improver = improver.to(accelerator.device)
    if accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))  # no oversubscription
    resume = _resume_point(out)
    if resume is None:
        fit_normalization(improver, dataset)
    locator = list(improver.net.locator.parameters()) if improver.net.locator is not None else []
    rest = [p for p in improver.parameters() if p.requires_grad and all(p is not q for q in locator)]
    groups = [{"params": rest}] + ([{"params": locator, "lr": config.task_lr}] if locator else [])
    optimizer = accelerator.prepare(torch.optim.Adam(groups, lr=config.lr))
    state = _Progress()
    accelerator.register_for_checkpointing(improver, state)
    if resume is not None:
        accelerator.load_state(str(resume))
    accelerator.init_trackers("meta_train", config=asdict(config))
    ladders = _ladders(improver, dataset) if config.locate_ranked and improver.net.config.task_dim else {}
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(total=config.steps, initial=state.step, desc="meta-train", disable=not (progress and accelerator.is_local_main_process))
    while state.step < config.steps:
        batch = _batch(len(dataset), config, state.step)
        parts: list[dict[str, float]] = []
        with accelerator.autocast():
            loss = torch.zeros((), device=accelerator.device)
            for i in batch[rank::world]:
                generator = torch.Generator().manual_seed(derive_seed(config.seed, state.step, i))
                example = _scored(improver, dataset.example(i))
                value, info = example_loss(improver, example, config, generator, ladders.get(example.lesser.tasks[0].index))
                loss = loss + value / len(batch)
                parts.append(info)
        optimizer.zero_grad()
        accelerator.backward(loss)
        if world > 1:  # per-example graphs do not go through DDP's forward, so sum gradients here
            for parameter in improver.parameters():
                if parameter.grad is not None:
                    parameter.grad = accelerator.reduce(parameter.grad, reduction="sum")
        grad_norm = nn.utils.clip_grad_norm_(improver.parameters(), config.grad_clip)
        optimizer.step()
        state.step += 1
        metrics = {"loss": float(accelerator.reduce(loss.detach(), reduction="sum")), "grad_norm": float(grad_norm)}
        metrics |= {k: sum(p[k] for p in parts) / max(1, len(parts)) for k in ("nll", "mode_mse", "distill_mse", "task_mse")}
        accelerator.log(metrics, step=state.step)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if validation is not None and accelerator.is_main_process and (
            state.step == config.steps or (config.validate_every and state.step % config.validate_every == 0)
        ):
            scores = heldout_success(improver, validation, seed=config.seed)
            accelerator.log({f"val/{k}": v for k, v in scores.items()}, step=state.step)
            bar.write(f"step {state.step}: held-out success {scores['success_before']:.2f} -> {scores['success_after']:.2f} after one step")
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            _checkpoint(accelerator, out)
    bar.close()
    if accelerator.is_main_process:
        improver.save_pretrained(out / "improver", metadata={"meta_train": asdict(config), "dataset": str(dataset.root), "examples": len(dataset)})
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group: nothing collective after this
    return improver


def _batch(size: int, config: MetaTrainConfig, step: int) -> list[int]:
    """The examples of ``step``: a fresh permutation per epoch, so a resumed run sees the same order."""
    per_epoch = max(1, size // config.batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed(config.seed, epoch))).tolist()
    return order[offset * config.batch_size : (offset + 1) * config.batch_size]


def _checkpoint(accelerator: Accelerator, out: Path) -> None:
    """Save the full training state to ``out/checkpoints/latest`` without ever leaving it half-written."""
    staging = out / "checkpoints" / "staging"
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        latest = out / "checkpoints" / "latest"
        previous = out / "checkpoints" / "previous"
        shutil.rmtree(previous, ignore_errors=True)
        if latest.exists():
            latest.rename(previous)
        staging.rename(latest)
        shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume_point(out: Path) -> Path | None:
    """The newest complete checkpoint (``previous`` if a kill landed between the two renames)."""
    for name in ("latest", "previous"):
        if (out / "checkpoints" / name).is_dir():
            return out / "checkpoints" / name
    return None
