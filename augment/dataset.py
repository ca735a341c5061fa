"""The on-disk meta-training dataset: HDF5 shards, one per task, and a checksummed manifest.

Layout of a dataset folder::

    manifest.json            config, shard list with SHA-256 and example counts, D-REX check
    shards/<split>-<index>.h5
        /ranked              noise-ladder episodes of the expert and their ``levels``
        /better              the least-noisy ladder episodes (the "better behaviour" reference)
        /examples/<j>/theta  the lesser policy's parameters (one dataset per tensor)
        /examples/<j>/lesser its episodes (states, actions, rewards, success, frames at a stride)
        /examples/<j>/target_actions  the expert's actions relabelled on the lesser's states

Every shard is written to a temporary file and renamed, so a shard that exists is complete;
datasets are written without timestamps so the same seed gives byte-identical shards. Each shard
records the task it holds and the settings it was made with (its ``task`` attribute), and every
read checks them against its file name and the manifest, so a shard copied over another is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from improver.io import atomic_path
from improver.policies import build_policy
from improver.saved_files import read_json_object
from improver.types import TaskInfo, Trajectory

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_SHARD_NAME = re.compile(r"(?P<split>\w+)-(?P<index>\d{4,})\.h5")
_TENSOR_FIELDS = ("observations", "actions", "rewards", "successes", "mask", "frames", "frame_steps")


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(split: str, index: int) -> str:
    """File name of the shard of task ``index`` of ``split``."""
    return f"{split}-{index:04d}.h5"


def shard_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What a shard records of the settings it was made with: the dataset's ``config`` (``asdict(GenerateConfig)``).

    All but ``tasks``, which picks the dataset's tasks and does not change how one is made; as
    JSON gives it back, so a record read from a file compares equal.
    """
    return json.loads(json.dumps({k: v for k, v in config.items() if k != "tasks"}, default=str))


def check_shard(path: Path, holds: dict[str, Any], checksum: str | None = None) -> None:
    """Check, before trusting it, that the shard at ``path`` opens and holds what it should.

    Args:
        path: The shard file.
        holds: Entries its task record must have (e.g. ``split``, ``index``, ``settings``).
        checksum: Its SHA-256 as the manifest records it (``None``: not checked).

    Raises:
        ValueError: naming the shard, if it is unreadable (e.g. truncated), corrupted (another
            checksum), or records another task or settings (copied from elsewhere).
    """
    try:
        digest = sha256(path) if checksum is not None else None
        with h5py.File(path, "r") as f:
            record = json.loads(f.attrs["task"])
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"shard {path} is unreadable ({err}); regenerate it") from err
    if digest != checksum:
        raise ValueError(f"shard {path} is corrupted (checksum mismatch); regenerate it")
    wrong = [k for k in holds if not isinstance(record, dict) or record.get(k) != holds[k]]
    if wrong:
        found = {k: record.get(k) for k in wrong} if isinstance(record, dict) else record
        raise ValueError(
            f"shard {path} records {found}, where {({k: holds[k] for k in wrong})} was expected: "
            "it holds another task or dataset (copied over?); regenerate it"
        )


def _put(group: h5py.Group, name: str, value: np.ndarray) -> None:
    # Chunked and compressed along episodes; no timestamps, so identical data gives identical bytes.
    chunks = (1, *value.shape[1:]) if value.ndim >= 2 and value.shape[0] > 0 else None
    group.create_dataset(name, data=value, chunks=chunks, compression="gzip" if chunks else None, track_times=False)


def write_trajectory(group: h5py.Group, trajectory: Trajectory) -> None:
    """Store ``trajectory``'s tensors as datasets of ``group`` and its task infos as a JSON attribute."""
    for name in _TENSOR_FIELDS:
        value = getattr(trajectory, name)
        if value is not None:
            _put(group, name, value.numpy())
    group.attrs["tasks"] = json.dumps([info._asdict() for info in trajectory.tasks])


def _task_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A stored task record as :class:`TaskInfo` fields; records written before the task
    parameters were named so keep them under ``"goal"``."""
    fields = {k: v for k, v in record.items() if k != "goal"}
    fields["parameters"] = tuple(record["parameters"] if "parameters" in record else record["goal"])
    return fields


def read_trajectory(group: h5py.Group) -> Trajectory:
    """Inverse of :func:`write_trajectory`."""
    values = {name: torch.from_numpy(group[name][()]) if name in group else None for name in _TENSOR_FIELDS}
    tasks = tuple(TaskInfo(**_task_fields(t)) for t in json.loads(group.attrs["tasks"]))
    return Trajectory(tasks=tasks, **values)


def write_shard(
    path: Path,
    *,
    task: dict[str, Any],
    ranked: Trajectory,
    levels: torch.Tensor,
    better: Trajectory,
    examples: list[dict[str, Any]],
) -> None:
    """Write one task's shard atomically.

    Args:
        path: Destination ``.h5`` file.
        task: JSON-ready description of the task.
        ranked: Noise-ladder episodes; ``levels`` ``[B]`` their noise levels.
        better: Reference episodes of better behaviour.
        examples: Per lesser policy: ``theta`` (name -> tensor), ``architecture`` and ``record``
            dicts, ``lesser`` (Trajectory) and ``target_actions`` ``[K, T, act_dim]``.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["task"] = json.dumps(task)
            write_trajectory(f.create_group("ranked"), ranked)
            _put(f["ranked"], "levels", levels.numpy())
            write_trajectory(f.create_group("better"), better)
            group = f.create_group("examples", track_order=True)
            for j, example in enumerate(examples):
                g = group.create_group(str(j))
                theta = g.create_group("theta", track_order=True)
                for name, tensor in example["theta"].items():
                    theta.create_dataset(name, data=tensor.detach().cpu().numpy(), track_times=False)
                g.attrs["architecture"] = json.dumps(example["architecture"])
                g.attrs["record"] = json.dumps(example["record"])
                write_trajectory(g.create_group("lesser"), example["lesser"])
                _put(g, "target_actions", example["target_actions"].numpy())


def shard_examples(path: Path) -> int:
    """Number of examples in a shard."""
    with h5py.File(path, "r") as f:
        return len(f["examples"])


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``root/manifest.json`` atomically."""
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))


def read_manifest(root: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a dataset's manifest and check that every shard opens and holds the task of its name.

    Args:
        root: Dataset folder.
        verify: Also check every shard's SHA-256 against the manifest (reads every byte).

    Raises:
        FileNotFoundError: no manifest (generation never finished).
        ValueError: an unknown format, or a missing, unreadable, corrupted or misplaced shard.
    """
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(f"{root} has no {MANIFEST}: not a dataset, or its generation has not finished")
    manifest = read_json_object(root / MANIFEST)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{root}: dataset format {manifest.get('format_version')!r}; this version reads {FORMAT_VERSION} "
            "(rerun `improver generate` with the same settings on it to remake its shards)"
        )
    if not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("shards"), dict):
        raise ValueError(f"{root / MANIFEST} lacks the dataset's config or shard list: it is damaged; rerun `improver generate` on the folder")
    settings = shard_settings(manifest["config"])
    for name, entry in manifest["shards"].items():
        match = _SHARD_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{root}: its manifest lists {name!r}, which is not a shard name (<split>-<index>.h5)")
        shard = root / "shards" / name
        if not shard.is_file():
            raise ValueError(f"{root}: shard {name} is missing")
        holds = {"split": match["split"], "index": int(match["index"]), "settings": settings}
        check_shard(shard, holds, entry["sha256"] if verify else None)
    return manifest


class Example(NamedTuple):
    """One improvement example as the improver consumes it.

    Attributes:
        lesser: The lesser policy's episodes (its experience).
        policy: The lesser policy, rebuilt from its stored parameters.
        target_actions: ``[K, T, act]`` the expert's actions on the lesser's states.
        better: Better episodes on the same task.
        record: The zoo record (recipe, measured success and return).
    """

    lesser: Trajectory
    policy: torch.nn.Module
    target_actions: torch.Tensor
    better: Trajectory
    record: dict[str, Any]


class ImprovementDataset(Dataset):
    """Map-style dataset of improvement examples, one per (task, lesser policy).

    Each item is a dict of tensors and plain values, so the default ``DataLoader`` collate works
    when episodes share a length (Meta-World's always do):

    - ``observations [K, T, obs]``, ``actions [K, T, act]``, ``rewards [K, T]``, ``successes``,
      ``mask [K, T]`` and, if rendered, ``frames [K, F, 3, H, W]`` and ``frame_steps [F]``: the
      lesser policy's episodes.
    - ``target_actions [K, T, act]``: the expert's actions on the lesser's states.
    - ``better_observations [M, T, obs]``, ``better_actions``, ``better_mask``: better episodes.
    - ``theta``: the lesser policy's parameters by name; ``architecture`` and ``record``: JSON strings.
    - ``task``: JSON string of the task record.

    Args:
        root: Dataset folder (with ``manifest.json``).
        verify: Check shard checksums on open.
    """

    def __init__(self, root: str | Path, verify: bool = True) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root, verify)
        self.index = [(name, j) for name, entry in self.manifest["shards"].items() for j in range(entry["examples"])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, j = self.index[i]
        with h5py.File(self.root / "shards" / name, "r") as f:
            g = f["examples"][str(j)]
            item: dict[str, Any] = {k: torch.from_numpy(v[()]) for k, v in g["lesser"].items()}
            item["target_actions"] = torch.from_numpy(g["target_actions"][()])
            for k in ("observations", "actions", "mask"):
                item[f"better_{k}"] = torch.from_numpy(f["better"][k][()])
            item["theta"] = {k: torch.from_numpy(v[()]) for k, v in g["theta"].items()}
            item["architecture"] = g.attrs["architecture"]
            item["record"] = g.attrs["record"]
            item["task"] = f.attrs["task"]
        return item

    def example(self, i: int) -> Example:
        """Example ``i`` with its episodes as :class:`Trajectory` objects and its policy rebuilt."""
        name, j = self.index[i]
        with h5py.File(self.root / "shards" / name, "r") as f:
            g = f["examples"][str(j)]
            architecture = json.loads(g.attrs["architecture"])
            state = {k: torch.from_numpy(v[()]) for k, v in g["theta"].items()}
            kwargs = {k: v for k, v in architecture.items() if k != "class"}
            return Example(
                lesser=read_trajectory(g["lesser"]),
                policy=build_policy(architecture["class"], kwargs, state),
                target_actions=torch.from_numpy(g["target_actions"][()]),
                better=read_trajectory(f["better"]),
                record=json.loads(g.attrs["record"]),
            )

    def ranked(self) -> tuple[Trajectory, torch.Tensor]:
        """All shards' noise-ladder episodes and their noise levels ``[B]`` (for the reward model)."""
        parts, levels = [], []
        for name in self.manifest["shards"]:
            with h5py.File(self.root / "shards" / name, "r") as f:
                parts.append(read_trajectory(f["ranked"]))
                levels.append(torch.from_numpy(f["ranked"]["levels"][()]))
        return Trajectory.cat(parts), torch.cat(levels)
