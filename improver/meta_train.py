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
    distill_states: int = 256
    """States sampled per example for the differentiable distillation."""
    checkpoint_every: int = 50
    """Steps between checkpoints (``accelerator.save_state``)."""
    validate_every: int = 0
    """Steps between held-out validations (0: only at the end); needs a validation dataset."""
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
    observations, rewards = [], []
    for i in range(len(dataset)):
        example = dataset.example(i)
        observations += [example.lesser.observations[example.lesser.mask], example.better.observations[example.better.mask]]
        rewards.append(example.lesser.rewards[example.lesser.mask])
    states = torch.cat(observations)
    net = improver.net
    net.obs_mean.copy_(states.mean(dim=0))
    net.obs_std.copy_(states.std(dim=0).clamp(min=1e-3))
    net.reward_scale.copy_(torch.cat(rewards).abs().max().clamp(min=1e-6))


def example_loss(improver: Improver, example: Example, distill_states: int, distill_weight: float, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """Meta-training loss of one example, and its parts."""
    device = improver.log_lrs.device
    net = improver.net
    lesser, better = example.lesser.to(device), example.better.to(device)
    policy = example.policy.to(device)
    real = lesser.observations[lesser.mask]
    probes = real[net.probe_index(len(real))]
    with torch.no_grad():
        probe_actions = policy(probes)
    z = net.encode(lesser, probe_actions, probes)
    states = torch.cat([lesser.observations[lesser.mask], better.observations[better.mask]])
    targets = torch.cat([example.target_actions.to(device)[lesser.mask], better.actions[better.mask]])
    nll = -net.head.log_prob(net.normalize(states), z, targets).mean()
    # The likelihood alone does not make the most likely component's mean the right action.
    mode = nn.functional.mse_loss(net.head.act(net.normalize(states), z), targets)
    distill = torch.zeros((), device=device)
    if distill_weight > 0:
        lesser_states = lesser.observations[lesser.mask]
        pick = torch.randperm(len(lesser_states), generator=generator)[:distill_states].to(device)
        check = torch.randperm(len(states), generator=generator)[:distill_states].to(device)
        distilled = improver.distill(
            policy, lesser_states[pick], net.head.act(net.normalize(lesser_states[pick]), z), differentiable=True, probe=states[check]
        )
        distill = nn.functional.mse_loss(distilled, targets[check])
    loss = nll + mode + distill_weight * distill
    return loss, {"nll": nll.item(), "mode_mse": mode.item(), "distill_mse": distill.item()}


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
    optimizer = accelerator.prepare(torch.optim.Adam(improver.parameters(), lr=config.lr))
    state = _Progress()
    accelerator.register_for_checkpointing(improver, state)
    if resume is not None:
        accelerator.load_state(str(resume))
    accelerator.init_trackers("meta_train", config=asdict(config))
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(total=config.steps, initial=state.step, desc="meta-train", disable=not (progress and accelerator.is_local_main_process))
    while state.step < config.steps:
        batch = _batch(len(dataset), config, state.step)
        parts: list[dict[str, float]] = []
        with accelerator.autocast():
            loss = torch.zeros((), device=accelerator.device)
            for i in batch[rank::world]:
                generator = torch.Generator().manual_seed(derive_seed(config.seed, state.step, i))
                value, info = example_loss(improver, dataset.example(i), config.distill_states, config.distill_weight, generator)
                loss = loss + value / len(batch)
                parts.append(info)
        optimizer.zero_grad()
        accelerator.backward(loss)
        if world > 1:  # per-example graphs do not go through DDP's forward, so sum gradients here
            for parameter in improver.parameters():
                if parameter.grad is not None:
                    parameter.grad = accelerator.reduce(parameter.grad, reduction="sum")
        optimizer.step()
        state.step += 1
        metrics = {"loss": float(accelerator.reduce(loss.detach(), reduction="sum"))}
        metrics |= {k: sum(p[k] for p in parts) / max(1, len(parts)) for k in ("nll", "mode_mse", "distill_mse")}
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
