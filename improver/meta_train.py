"""Meta-training of the improver on an improvement dataset: the only module that knows Accelerate.

Loss per example: the behaviour head's negative log-likelihood of the better actions (the
expert's on the lesser policy's states, and the better episodes' own), plus the error of the
lesser policy after it has been distilled toward ``g``, differentiated through the distillation
steps with ``higher``. One code path for CPU, one GPU and several processes.

A run folder ``OUT`` holds::

    settings.json            the run's settings, compared on every resume
    checkpoints/latest/      the newest complete checkpoint (``previous`` after a kill mid-rotation)
        improver.safetensors   the improver's state dict
        optimizer.safetensors  Adam's per-parameter state, keyed ``<param index>.<name>``
        progress.json          the step counter
    meta_train/              TensorBoard logs
    improver/                the trained improver (``Improver.save_pretrained``)

Everything is read with safetensors and JSON: no file in a run folder can execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save
from torch import nn
from tqdm.auto import tqdm

from improver.augment.dataset import MANIFEST, Example, ImprovementDataset
from improver.augment.noise import derive_seed
from improver.types import Trajectory

from .io import atomic_path
from .loop import heldout_success
from .network import ImprovementNet, NetworkConfig
from .operator import Improver
from .saved_files import check_keys, cpu_tensors, read_json_object, read_weights, write_weights
from .task_inference import DEFAULT_TASK_INFERENCE, task_parameters

SETTINGS = "settings.json"
SETTINGS_FORMAT = 1
CHECKPOINT_FILES = ("improver.safetensors", "optimizer.safetensors", "progress.json")
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
RENAMED_SETTINGS = {"meta_train": {"goal_forcing": "task_forcing"}}
"""Keys of older ``settings.json`` files, by section, and their names now."""
ADDED_SETTINGS = {"network": {"task_inference": DEFAULT_TASK_INFERENCE}}
"""Keys added to ``settings.json`` since, by section, and the value a run recorded without them had."""


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
    """Weight of the task inference's loss (its belief against the episodes' true task parameters)."""
    task_lr: float = 1e-2
    """Adam learning rate of the task inference's parameters (the default implementation's few
    dozen parameters, fed by one loss, need about 3000 steps at this rate, measured on the toy suite)."""
    task_forcing: float | None = 0.1
    """With task inference: the head learns from the belief that holds the true task parameters,
    plus noise of this size (in normalised units), in place of the inferred one, so it learns to act
    on a task while the inference is still poor; None: from the inferred belief."""
    grad_clip: float = 1.0
    """Largest gradient norm: a mixture likelihood can spike on an outlying target action."""
    distill_states: int = 256
    """States sampled per example for the differentiable distillation."""
    checkpoint_every: int = 50
    """Steps between checkpoints (in ``OUT/checkpoints``)."""
    validate_every: int = 0
    """Steps between held-out validations (0: only at the end); needs a validation dataset."""
    locate_ranked: bool = True
    """With task inference: it also learns to infer each task from the task's noise-ladder
    episodes (see :func:`example_loss`)."""
    seed: int = 0
    """Seed of the example order and state sampling."""

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "lr", "task_lr", "grad_clip", "distill_states", "checkpoint_every")
        non_negative = ("distill_weight", "task_weight", "validate_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"MetaTrainConfig.{name} must be positive; got {getattr(self, name)!r}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"MetaTrainConfig.{name} must be 0 or more; got {getattr(self, name)!r}")
        if self.task_forcing is not None and not self.task_forcing >= 0:
            raise ValueError(f"MetaTrainConfig.task_forcing must be None (learn from the inferred belief) or 0 or more; got {self.task_forcing!r}")


def build_improver(
    dataset: ImprovementDataset,
    *,
    width: int = 64,
    token_stride: int = 10,
    frames: bool = False,
    task_inference: str | None = DEFAULT_TASK_INFERENCE,
    distill_steps: int = 20,
    fit_epochs: int = 20,
    reward_free: bool = False,
    seed: int = 0,
) -> Improver:
    """A fresh improver for meta-training on ``dataset``, its sizes read from the dataset's episodes.

    Args:
        dataset: The training dataset (observation, action and task-parameter sizes come from its first example).
        width: Token and context width.
        token_stride: One experience token every this many steps.
        frames: Watch frames too (the dataset must have them).
        task_inference: Which task inference infers the dataset's task parameters
            (:data:`improver.task_inference.TaskInferenceName`); ``None``: none.
        distill_steps: Meta-learned distillation steps of parameters mode.
        fit_epochs: If above 0, parameters mode fits the policy with Adam for this many epochs instead.
        reward_free: Read a ranking reward model's rewards (attach it as ``improver.reward_model``).
        seed: Seed of the initial weights (the global random state is left as it was).
    """
    example = dataset.example(0)
    task_dim = len(task_parameters(example.lesser.tasks[0])) if task_inference is not None else 0
    network = NetworkConfig(
        example.lesser.observations.shape[-1], example.lesser.actions.shape[-1], width=width, token_stride=token_stride, use_frames=frames,
        task_dim=task_dim, task_inference=task_inference or DEFAULT_TASK_INFERENCE,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Improver(network, distill_steps, fit_epochs, reward_free=reward_free)


def fit_normalization(improver: Improver, dataset: ImprovementDataset) -> None:
    """Set the network's observation, reward and task-parameter scales from the dataset's episodes."""
    observations, rewards, parameters = [], [], []
    for i in range(len(dataset)):
        example = _scored(improver, dataset.example(i))
        observations += [example.lesser.observations[example.lesser.mask], example.better.observations[example.better.mask]]
        rewards.append(example.lesser.rewards[example.lesser.mask])
        parameters.append(task_parameters(example.lesser.tasks[0]))
    states = torch.cat(observations)
    net = improver.net
    net.obs_mean.copy_(states.mean(dim=0))
    net.obs_std.copy_(states.std(dim=0).clamp(min=1e-3))
    net.reward_scale.copy_(torch.cat(rewards).abs().max().clamp(min=1e-6))
    if net.task_inference is not None:
        net.task_inference.fit_normalization(torch.stack(parameters))


def _scored(improver: Improver, example: Example) -> Example:
    """``example`` whose lesser experience carries the rewards the improver reads at a step."""
    return example._replace(lesser=improver.scored(example.lesser)) if improver.reward_free else example


def noise_ladders(improver: Improver, dataset: ImprovementDataset) -> dict[int, Trajectory]:
    """Each task's noise-ladder episodes, with the rewards the improver reads, by task index."""
    ranked, _ = dataset.ranked()
    if improver.reward_free:
        ranked = improver.scored(ranked)
    indices = torch.tensor([info.index for info in ranked.tasks])
    return {int(k): ranked.take(indices == k) for k in indices.unique()}


def task_target(net: ImprovementNet, experience: Trajectory) -> torch.Tensor:
    """The parameters ``[task_dim]`` of ``experience``'s (first) task, normalised by the network's task inference."""
    return net.task_inference.normalize(task_parameters(experience.tasks[0]))


def task_error(net: ImprovementNet, experience: Trajectory) -> torch.Tensor:
    """The task inference's loss on the belief it infers from ``experience`` (one task's episodes)."""
    return net.task_inference.loss(net.infer_task(experience), task_target(net, experience))


def example_loss(
    improver: Improver, example: Example, config: MetaTrainConfig, generator: torch.Generator, locate_also: Trajectory | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Meta-training loss of one example, and its parts.

    ``locate_also``: more episodes of the example's task (its noise ladder) that the task
    inference must also infer the task from. A lesser policy's own episodes can say little about
    the task (push-v3 zoo policies rarely touch the puck), while the policies after a step push it
    around: trained on the lesser episodes alone, the inference answered about the tasks' mean
    after a step too. Measured on push-v3 held-out tasks: with the ladders it uses the episodes
    after a step on some tasks (one: 14.7 cm off from the lesser episodes, 1.5 cm from the step-1
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
    inference = net.task_inference
    if inference is not None:
        truth = task_target(net, lesser)
        task = inference.loss(net.belief(z), truth)
        if locate_also is not None:
            task = (task + task_error(net, locate_also.to(device))) / 2
        if config.task_forcing is not None:
            noise = config.task_forcing * torch.randn(inference.belief_dim, generator=generator).to(device)
            z = net.with_belief(z, inference.forced(truth, noise))
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
    uninterrupted run would have. ``out/settings.json`` binds the folder to its run's settings
    (see :func:`run_settings`): a rerun may only change ``config.steps``, to the checkpoint's
    step or more, so a run can be extended or cut short but never continued with other settings.
    With a ``validation`` dataset of held-out tasks, the success of its lesser policies after
    one ``step`` is measured (in the environment) and logged as ``val/success_before`` and
    ``val/success_after``. Returns the trained improver (also written to ``out/improver``).

    Raises:
        ValueError: ``out`` was started with other settings or by an older version, holds a
            checkpoint past ``config.steps``, files meta-training did not write in its
            checkpoint folders, or a damaged checkpoint. Nothing in ``out`` is changed then.
    """
    out = Path(out)
    settings = run_settings(improver, dataset, config)
    resume = _check_run_folder(out, settings, config.steps)  # before anything is written
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available(), log_with="tensorboard", project_dir=out)
    improver = improver.to(accelerator.device)
    if accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))  # no oversubscription
    inference = improver.net.task_inference
    inferring = list(inference.parameters()) if inference is not None else []
    rest = [p for p in improver.parameters() if p.requires_grad and all(p is not q for q in inferring)]
    groups = [{"params": rest}] + ([{"params": inferring, "lr": config.task_lr}] if inferring else [])
    adam = torch.optim.Adam(groups, lr=config.lr)
    # Loaded after prepare(), which would move the state's step counters onto the GPU (a fresh run keeps them on the CPU).
    optimizer = accelerator.prepare(adam)
    if resume is None:
        fit_normalization(improver, dataset)
        step = 0
    else:
        step = _load_checkpoint(resume, improver, adam)
    if accelerator.is_main_process:
        with atomic_path(out / SETTINGS) as tmp:
            tmp.write_text(json.dumps(settings, indent=2))
    accelerator.init_trackers("meta_train", config=asdict(config))
    ladders = noise_ladders(improver, dataset) if config.locate_ranked and inference is not None else {}
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(total=config.steps, initial=step, desc="meta-train", disable=not (progress and accelerator.is_local_main_process))
    while step < config.steps:
        batch = _batch(len(dataset), config, step)
        parts: list[dict[str, float]] = []
        with accelerator.autocast():
            loss = torch.zeros((), device=accelerator.device)
            for i in batch[rank::world]:
                generator = torch.Generator().manual_seed(derive_seed(config.seed, step, i))
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
        step += 1
        metrics = {"loss": float(accelerator.reduce(loss.detach(), reduction="sum")), "grad_norm": float(grad_norm)}
        metrics |= {k: sum(p[k] for p in parts) / max(1, len(parts)) for k in ("nll", "mode_mse", "distill_mse", "task_mse")}
        accelerator.log(metrics, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if validation is not None and accelerator.is_main_process and (
            step == config.steps or (config.validate_every and step % config.validate_every == 0)
        ):
            scores = heldout_success(improver, validation, seed=config.seed)
            accelerator.log({f"val/{k}": v for k, v in scores.items()}, step=step)
            bar.write(f"step {step}: held-out success {scores['success_before']:.2f} -> {scores['success_after']:.2f} after one step")
        if accelerator.is_main_process and (step % config.checkpoint_every == 0 or step == config.steps):
            _checkpoint(out, improver, adam, step)
    bar.close()
    if accelerator.is_main_process:
        improver.save_pretrained(
            out / "improver", metadata={"meta_train": asdict(config), "dataset": str(dataset.root), "examples": len(dataset), "processes": world}
        )
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it tears down the process group, which `train`'s later stages still use
        tracker.finish()
    return improver


def run_settings(improver: Improver, dataset: ImprovementDataset, config: MetaTrainConfig) -> dict[str, Any]:
    """The settings a run folder is bound to, as ``settings.json`` holds them.

    Sections: ``meta_train`` (``config``), ``network`` (the improver's network config),
    ``improver`` (its other constructor settings and a SHA-256 of its ranking reward model's
    weights, if any) and ``data`` (the dataset's resolved path and its manifest's SHA-256,
    which covers every shard's SHA-256).
    """
    reward_model = improver.reward_model
    settings = {
        "format_version": SETTINGS_FORMAT,
        "meta_train": asdict(config),
        "network": asdict(improver.config),
        "improver": {
            "distill_steps": improver.distill_steps,
            "fit_epochs": improver.fit_epochs,
            "reward_free": improver.reward_free,
            "aim_offset": improver.aim_offset,
            "reward_model_sha256": None if reward_model is None else hashlib.sha256(save(cpu_tensors(reward_model.state_dict()))).hexdigest(),
        },
        "data": {
            "data": str(dataset.root.resolve()),
            "data_manifest_sha256": hashlib.sha256((dataset.root / MANIFEST).read_bytes()).hexdigest(),
        },
    }
    return json.loads(json.dumps(settings))  # as the file reads back: tuples become lists


def _check_run_folder(out: Path, settings: dict[str, Any], steps: int) -> Path | None:
    """The checkpoint to resume from (``None``: start afresh), after checking that ``out`` may
    continue with ``settings``, of which only ``meta_train.steps`` may differ (down to the
    checkpoint's step). Reads only."""
    path = out / SETTINGS
    if not path.exists():
        if (out / "checkpoints").exists():
            raise ValueError(
                f"{out / 'checkpoints'} has no {SETTINGS} beside it: it was written by an older version of meta-train "
                "(as Accelerate's pickled state) and cannot be resumed safely; use a new --out"
            )
        return None
    old = read_json_object(path)
    if old.get("format_version") != SETTINGS_FORMAT:
        raise ValueError(f"{path}: settings format {old.get('format_version')!r}; this version reads {SETTINGS_FORMAT}: use a new --out")
    check_keys(old, path, settings.keys())
    if not all(isinstance(old[section], dict) for section in settings if section != "format_version"):
        raise ValueError(f"{path} is damaged: each section except format_version must be a JSON object; use a new --out")
    # A run started by an older version recorded some settings under other names, or not at all.
    for section, renamed in RENAMED_SETTINGS.items():
        old[section] = {renamed.get(key, key): value for key, value in old[section].items()}
    for section, added in ADDED_SETTINGS.items():
        old[section] = {**added, **old[section]}
    differing = [
        (key, old[section].get(key, "(not recorded)"), value)
        for section, values in settings.items() if section != "format_version"
        for key, value in values.items()
        if (section, key) != ("meta_train", "steps") and old[section].get(key, "(not recorded)") != value
    ]
    if differing:
        was = ", ".join(f"{key}={value}" for key, value, _ in differing)
        asks = ", ".join(f"{key}={value}" for key, _, value in differing)
        raise ValueError(f"{out} was started with {was}; this run asks for {asks}: use a new --out, or the same settings")
    for name in ("staging", "latest", "previous"):
        _check_checkpoint_folder(out / "checkpoints" / name)
    resume = next((out / "checkpoints" / name for name in ("latest", "previous") if (out / "checkpoints" / name).is_dir()), None)
    if resume is not None and (step := _checkpoint_step(resume)) > steps:
        raise ValueError(f"{resume} is at step {step}; this run asks for steps={steps}: ask for {step} or more to resume, or use a new --out")
    return resume


def _check_checkpoint_folder(folder: Path) -> None:
    """Refuse a checkpoint folder that holds anything meta-training did not write: it is never read, nor deleted with the folder."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ValueError(f"{folder} is not a folder meta-training wrote (a link or a file): move it out of the way and rerun")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in CHECKPOINT_FILES) if folder.is_dir() else []
    if foreign:
        raise ValueError(
            f"{folder} holds {foreign}, which meta-training did not write and will neither load nor delete: "
            "move them out of the folder (a planted pickle would run code if anything unpickled it) and rerun"
        )


def _checkpoint_step(folder: Path) -> int:
    """The step counter of the checkpoint in ``folder``."""
    path = folder / "progress.json"
    progress = read_json_object(path)
    check_keys(progress, path, ("step",))
    step = progress["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{path}: step must be an integer, 0 or more; got {step!r}: the checkpoint is damaged, use a new --out")
    return step


def _load_checkpoint(folder: Path, improver: Improver, optimizer: torch.optim.Adam) -> int:
    """Load the checkpoint in ``folder`` into ``improver`` and ``optimizer``; returns its step."""
    path = folder / "improver.safetensors"
    try:
        improver.load_state_dict(read_weights(path))
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit the run's improver (the checkpoint is damaged): {err}") from err
    path = folder / "optimizer.safetensors"
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in read_weights(path).items():
        index, _, name = key.partition(".")
        known = index.isdecimal() and int(index) < len(parameters) and name in ADAM_STATE
        if not known or value.shape != (() if name == "step" else parameters[int(index)].shape):
            raise ValueError(
                f"{path}: entry {key!r} of shape {tuple(value.shape)} is not Adam's state of this run's {len(parameters)} parameters "
                "(the checkpoint is damaged)"
            )
        state.setdefault(int(index), {})[name] = value
    if incomplete := sorted(i for i, entries in state.items() if len(entries) != len(ADAM_STATE)):
        raise ValueError(f"{path}: the state of parameters {incomplete} lacks some of {list(ADAM_STATE)} (the checkpoint is damaged)")
    # The hyperparameters are this run's: the settings check made them equal to the checkpoint's.
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return _checkpoint_step(folder)


def _batch(size: int, config: MetaTrainConfig, step: int) -> list[int]:
    """The examples of ``step``: a fresh permutation per epoch, so a resumed run sees the same order."""
    per_epoch = max(1, size // config.batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed(config.seed, epoch))).tolist()
    return order[offset * config.batch_size : (offset + 1) * config.batch_size]


def _checkpoint(out: Path, improver: Improver, optimizer: torch.optim.Adam, step: int) -> None:
    """Save the training state to ``out/checkpoints/latest`` (main process only); a kill at any point leaves a complete checkpoint."""
    staging, latest, previous = (out / "checkpoints" / name for name in ("staging", "latest", "previous"))
    _discard(staging)
    staging.mkdir(parents=True)
    write_weights(improver.state_dict(), staging / "improver.safetensors")
    optimizer_state = optimizer.state_dict()["state"]
    write_weights({f"{i}.{name}": value for i, entries in optimizer_state.items() for name, value in entries.items()}, staging / "optimizer.safetensors")
    (staging / "progress.json").write_text(json.dumps({"step": step}))
    if latest.exists():  # a previous without a latest is the only complete checkpoint: it goes after staging is in place
        _discard(previous)
        latest.rename(previous)
    staging.rename(latest)
    _discard(previous)


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder by the files meta-training writes: anything else stays, and the folder with it."""
    if folder.is_dir():
        for name in CHECKPOINT_FILES:
            (folder / name).unlink(missing_ok=True)
        folder.rmdir()

