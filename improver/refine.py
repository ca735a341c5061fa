"""On-policy refinement on the loop's own episodes: the task inference learns to infer their tasks, the behaviour head to act on their states.

Meta-training shows the task inference the lesser policies' episodes and their tasks' noise
ladders. From step 2 on, the loop shows it something else: episodes of improved policies that
acted on its previous estimate (plus task exploration), which cluster around that estimate. As
in DAgger, the cure for that shift is to train on the states the learner visits itself:
:func:`refine_locator` runs the behaviour loop on the training tasks, keeps every step's
experience with the task's true parameters, and fits only the task inference to infer them from
each (:meth:`~improver.task_inference.TaskInference.experience_loss`).

The behaviour head meets the same shift: meta-training shows it the lesser policies' states and
the expert's, while the loop's improved policies reach states of their own (pick-place-v3: the
hand hovering above the object, which the head never learned to leave). With ``head_steps`` the
head is also fitted, DAgger-style, to the scripted expert's actions on the states of the loop's
steps 1 and on, under the context the loop computed there with the belief that holds the true
task parameters in place of the inferred one (as meta-training's task forcing does).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import h5py
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from improver.augment.dataset import ImprovementDataset, read_trajectory, write_trajectory
from improver.augment.generate import dataset_suite
from improver.tasks.rollout import relabel, rollout
from improver.types import Trajectory

from .io import atomic_path
from .loop import improvement_loop
from .loop_settings import LoopSettings
from .meta_train import task_target
from .network import ImprovementNet
from .operator import BehaviourPolicy, Improver
from .task_inference import task_parameters


@dataclass(frozen=True)
class RefineConfig:
    """Settings of :func:`refine_locator`: the loop that collects, then the task inference's fit."""

    loop_steps: int = 3
    """Improvement steps per training task (each one's episodes are kept, step 0's too)."""
    episodes: int = 10
    """Episodes per step."""
    exploration: float = 0.3
    """Action noise while collecting (as in the loop the improver will be used in)."""
    task_exploration: float = 0.04
    """Task exploration while collecting, in the task parameters' units."""
    wide_task_exploration: float = 0.0
    """Task exploration of a step whose previous step's episodes all failed (0: ``task_exploration``):
    collect under the rule the improver will be used with, so the task inference sees the spread it will see."""
    max_success: float = 0.3
    """Each task's loop starts from its first lesser policy with at most this recorded success."""
    steps: int = 500
    """Optimiser steps of the task inference's fit."""
    batch_size: int = 32
    """Experiences (one step's episodes each) per optimiser step."""
    lr: float = 1e-2
    """Adam learning rate of the task inference's fit."""
    experience_weight: float = 1.0
    """Weight of the task inference's own term on the loop's experience (see
    :meth:`~improver.task_inference.TaskInference.experience_loss`)."""
    head_steps: int = 0
    """Optimiser steps of the behaviour head's DAgger fit (0: the task inference only)."""
    head_lr: float = 3e-4
    """Adam learning rate of the head's fit."""
    head_batch_size: int = 2048
    """States per optimiser step of the head's fit."""
    task_forcing: float = 0.1
    """Noise (normalised units) on the belief that holds the true task parameters, which the head's fit
    puts in the context, as in meta-training."""
    aim_candidates: tuple[float, ...] = ()
    """Offsets (the task parameters' units) tried along each task-parameter axis in turn for the improver's
    ``aim_offset`` (:func:`calibrate_aim`); empty: no calibration."""
    seed: int = 0
    """Seed of the collected episodes and the fit."""


def collect_loop_episodes(
    improver: Improver, dataset: ImprovementDataset, config: RefineConfig, folder: Path, rank: int = 0, world: int = 1, progress: bool = True
) -> None:
    """Run the behaviour loop on each of the dataset's tasks (those with ``index % world == rank``) and
    write each task's experiences, one per step, to ``folder/task-IIII.h5``, each with the suite's expert
    actions on its states (``expert_actions``) and, from step 1 on, the loop's context (``context``).
    Tasks already written are skipped (a killed run resumes)."""
    starts: dict[int, int] = {}
    for i in range(len(dataset)):
        example = dataset.example(i)
        if example.record["success"] <= config.max_success:
            starts.setdefault(example.lesser.tasks[0].index, i)
    if not starts:
        raise ValueError(f"no lesser policy of the dataset has success <= {config.max_success}: nothing to start the loop from")
    mine = [(task, i) for task, i in sorted(starts.items()) if task % world == rank and not _task_file(folder, task).exists()]
    for task, i in tqdm(mine, desc=f"loop episodes (process {rank})", unit="task", disable=not progress):
        example = dataset.example(i)
        info = example.lesser.tasks[0]
        suite = dataset_suite(dataset.manifest["config"], info.suite_seed)  # the expert the dataset imitates
        env_task = suite.tasks(info.split)[info.index]
        loop = improvement_loop(
            improver, example.policy, env_task, config.loop_steps, config.episodes, seed=config.seed, mode="behaviour",
            exploration=config.exploration, task_exploration=config.task_exploration,
            wide_task_exploration=config.wide_task_exploration,
        )
        with atomic_path(_task_file(folder, task)) as tmp, h5py.File(tmp, "w") as f:
            for state in loop:
                group = f.create_group(str(state.step))
                write_trajectory(group, state.experience)
                group["expert_actions"] = relabel(suite.expert, state.experience).numpy()
                if isinstance(state.policy, BehaviourPolicy):
                    group["context"] = state.policy.z.cpu().numpy()


def refine_locator(
    improver: Improver,
    dataset: ImprovementDataset,
    config: RefineConfig,
    out: str | os.PathLike,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> tuple[Improver, dict[str, float]]:
    """Train ``improver``'s task inference on its own loop's episodes on ``dataset``'s (training) tasks.

    The episodes go to ``out/episodes`` (one file per task: a killed run resumes where it was),
    the refined improver to ``out/improver`` (with ``metadata``, e.g. the source's record). Only the
    task inference's parameters change, and with ``config.head_steps`` the behaviour head's (:func:`fit_head`).
    Processes started with ``accelerate launch`` split the tasks. The refined improver's
    ``loop_settings`` become those of the loop it was refined in (behaviour mode, ``config``'s exploration).

    Returns:
        The refined improver and the mean distance of its estimate from the true task parameters
        (in their units) on the collected episodes before and after the fit: ``error_before``, ``error_after``
        (training episodes: this says the fit worked, not how it does on held-out tasks);
        with ``head_steps`` also :func:`fit_head`'s scores.

    Raises:
        ValueError: if the improver infers no task, no lesser policy qualifies, or the head is
            to be fitted on episodes collected without the expert's actions.
    """
    net = improver.net
    inference = net.task_inference
    if inference is None:
        raise ValueError("this improver infers no task (task_dim 0): there is no task inference to refine")
    out = Path(out)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    improver = improver.to(accelerator.device)
    with torch.no_grad():
        collect_loop_episodes(improver, dataset, config, out / "episodes", accelerator.process_index, accelerator.num_processes, progress)
    accelerator.wait_for_everyone()
    with torch.no_grad():  # the rewards a step reads: a reward-free improver's come from its ranking reward model
        experiences = [improver.scored(e.to(accelerator.device)) for path in sorted((out / "episodes").glob("task-*.h5")) for e in read_loop_episodes(path)]
    before = _mean_error(improver, experiences)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(inference.parameters(), lr=config.lr)
    for _ in tqdm(range(config.steps), desc="fit task inference", disable=not (progress and accelerator.is_local_main_process)):
        batch = torch.randperm(len(experiences), generator=generator)[: config.batch_size].tolist()
        loss = sum(refine_error(net, experiences[i], config.experience_weight) for i in batch) / len(batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(inference.parameters(), 1.0)
        optimizer.step()
    scores = {"error_before": before, "error_after": _mean_error(improver, experiences), "experiences": len(experiences)}
    if config.head_steps:
        scores.update(fit_head(improver, _read_head_data(out / "episodes"), config, generator, progress and accelerator.is_local_main_process))
    if config.aim_candidates:
        offset, returns = calibrate_aim(improver, out / "episodes", config.aim_candidates, config.seed, progress and accelerator.is_local_main_process)
        improver.aim_offset = offset
        scores.update({"aim_offset": list(offset), "aim_return_before": returns[0], "aim_return_after": max(returns)})
    # the refined improver is meant for the loop it was refined in: that loop becomes its default
    improver.loop_settings = LoopSettings(
        "behaviour", config.exploration, config.task_exploration, config.wide_task_exploration, improver.loop_settings.memory
    )
    if accelerator.is_main_process:
        improver.save_pretrained(out / "improver", metadata={**(metadata or {}), "refine_locator": asdict(config), "dataset": str(dataset.root), **scores})
    accelerator.wait_for_everyone()
    return improver, scores


def refine_error(net: ImprovementNet, experience: Trajectory, weight: float) -> torch.Tensor:
    """The task inference's :meth:`~improver.task_inference.TaskInference.experience_loss` on one experience (its own term weighted by ``weight``)."""
    return net.task_inference.experience_loss(*net.task_inputs(experience), task_target(net, experience), weight)


class HeadData(NamedTuple):
    """The head's DAgger data: the states of the loop's steps 1 and on, with what the fit reads there."""

    states: torch.Tensor
    """``[N, obs_dim]`` visited states."""
    actions: torch.Tensor
    """``[N, act_dim]`` the expert's actions on them."""
    contexts: torch.Tensor
    """``[E, context_dim]`` the context of each experience (one loop step of one task)."""
    parameters: torch.Tensor
    """``[E, task_dim]`` each experience's true task parameters, in their own units."""
    experience: torch.Tensor
    """``[N]`` the experience each state belongs to."""


def fit_head(improver: Improver, data: HeadData, config: RefineConfig, generator: torch.Generator, progress: bool = True) -> dict[str, float]:
    """Fit ``improver``'s behaviour head to the expert's actions on the loop's states (in place).

    Returns the squared error of the head's actions on all the states (true task, no noise) before
    and after: ``head_mse_before``, ``head_mse_after`` (training states: the fit worked, no more).
    """
    net = improver.net
    inference = net.task_inference
    device = improver.log_lrs.device
    data = HeadData(*(t.to(device) for t in data))
    targets = inference.normalize(data.parameters)

    def loss(rows: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        which = data.experience[rows]
        belief = inference.forced(targets[which], noise * torch.randn((len(rows), inference.belief_dim), generator=generator).to(device))
        z = net.with_belief(data.contexts[which], belief)
        return net.head.imitation_loss(net.normalize(data.states[rows]), z, data.actions[rows])

    def mse() -> float:
        with torch.no_grad():
            return float(sum(loss(rows, 0.0)[1] * len(rows) for rows in torch.arange(len(data.states), device=device).split(65536)) / len(data.states))

    before = mse()
    optimizer = torch.optim.Adam(net.head.parameters(), lr=config.head_lr)
    for _ in tqdm(range(config.head_steps), desc="fit head", disable=not progress):
        nll, mode = loss(torch.randint(len(data.states), (config.head_batch_size,), generator=generator).to(device), config.task_forcing)
        optimizer.zero_grad()
        (nll + mode).backward()
        torch.nn.utils.clip_grad_norm_(net.head.parameters(), 1.0)
        optimizer.step()
    return {"head_mse_before": before, "head_mse_after": mse(), "head_states": len(data.states)}


def calibrate_aim(
    improver: Improver, folder: Path, candidates: Sequence[float], seed: int = 0, progress: bool = True
) -> tuple[tuple[float, ...], list[float]]:
    """Choose the improver's ``aim_offset`` on the training tasks of the loop episodes in ``folder``.

    An imitated expert can leave what it carries off the target it is given (pick-place-v3's holds the
    object 4.5 cm under the hand it brings to the target), so acting exactly on the inferred task is not
    always best. From each task's last loop context, the head acts without noise for one episode per
    offset; along each task-parameter axis in turn the offset with the highest mean return over the tasks is kept
    (the others' values fixed). The contexts already hold the collecting improver's ``aim_offset``, so
    the result adds to it.

    Returns:
        The new ``aim_offset`` and the mean return of every offset tried (the first: no change).
    """
    from .tasks import make_suite

    net = improver.net
    finals = []
    for path in sorted(folder.glob("task-*.h5")):
        with h5py.File(path, "r") as f:
            last = f[max(f, key=int)]
            if "context" not in last:
                raise ValueError(f"{path} holds no loop context (collected by an older refine-locator, or with loop_steps 0): collect into a new --out")
            info = read_trajectory(last).tasks[0]
            finals.append((make_suite(info.suite, info.suite_seed).tasks(info.split)[info.index], torch.from_numpy(last["context"][()])))
    bar = tqdm(total=1 + len(candidates) * net.config.task_dim, desc="calibrate aim", disable=not progress)

    def mean_return(offset: torch.Tensor) -> float:
        with torch.no_grad():
            total = sum(float(rollout(BehaviourPolicy(net, net.shifted(z, offset)).eval(), task, 1, seed=seed, progress=False).returns.mean()) for task, z in finals)
        bar.update(1)
        return total / len(finals)

    offset = torch.zeros(net.config.task_dim)
    returns = [mean_return(offset)]
    best = returns[0]
    for axis in range(net.config.task_dim):
        kept = offset
        for value in candidates:
            trial = offset.clone()
            trial[axis] = value
            returns.append(mean_return(trial))
            if returns[-1] > best:
                best, kept = returns[-1], trial
        offset = kept
    bar.close()
    return tuple(float(a + b) for a, b in zip(improver.aim_offset, offset)), returns


def _read_head_data(folder: Path) -> HeadData:
    states, actions, contexts, parameters, owner = [], [], [], [], []
    for path in sorted(folder.glob("task-*.h5")):
        with h5py.File(path, "r") as f:
            for name in sorted(f, key=int):
                if "expert_actions" not in f[name]:
                    raise ValueError(f"{path} was collected without the expert's actions (an older refine-locator run): collect into a new --out to fit the head")
                if "context" not in f[name]:
                    continue  # step 0: the user's policy, not the head, acted
                experience = read_trajectory(f[name])
                mask = experience.mask
                states.append(experience.observations[mask])
                actions.append(torch.from_numpy(f[name]["expert_actions"][()])[mask])
                contexts.append(torch.from_numpy(f[name]["context"][()]))
                parameters.append(task_parameters(experience.tasks[0]))
                owner.append(torch.full((int(mask.sum()),), len(owner)))
    if not states:
        raise ValueError(f"{folder} holds no loop step after step 0 to fit the head on (loop_steps must be at least 1)")
    return HeadData(torch.cat(states).float(), torch.cat(actions).float(), torch.stack(contexts), torch.stack(parameters), torch.cat(owner))


def _task_file(folder: Path, task: int) -> Path:
    return folder / f"task-{task:04d}.h5"


def read_loop_episodes(path: Path) -> list[Trajectory]:
    """One task's file of :func:`collect_loop_episodes`: the experience of each loop step, step 0 first."""
    with h5py.File(path, "r") as f:
        return [read_trajectory(f[name]) for name in sorted(f, key=int)]


def _mean_error(improver: Improver, experiences: list[Trajectory]) -> float:
    """Mean distance between the estimated and the true task parameters, in their own units."""
    net = improver.net
    with torch.no_grad():
        errors = [(net.task_inference.estimate(net.infer_task(e)) - task_parameters(e.tasks[0]).to(e.observations)).norm() for e in experiences]
    return float(torch.stack(errors).mean())
