"""Small parametric policies and their checkpoints (safetensors weights + a JSON record)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .io import FolderKind, atomic_path
from .saved_files import check_keys, load_weights, read_json_object, write_weights

FORMAT_VERSION = 1


class MLPPolicy(nn.Module):
    """A deterministic MLP policy ``[B, obs_dim] -> [B, act_dim]`` with tanh-bounded actions.

    Args:
        obs_dim: Observation size.
        act_dim: Action size.
        hidden: Hidden layer widths.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (64, 64)) -> None:
        super().__init__()
        self.config = {"obs_dim": obs_dim, "act_dim": act_dim, "hidden": list(hidden)}
        sizes = [obs_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], act_dim), nn.Tanh())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Actions ``[B, act_dim]`` in ``[-1, 1]`` for observations ``[B, obs_dim]``."""
        return self.net(observations)


def placement(policy: Any) -> tuple[torch.device, torch.dtype]:
    """Device and dtype a policy's inputs should have: its parameters', or CPU float32.

    Raises:
        ValueError: the policy's weights are on the ``meta`` device (shapes without values).
    """
    if not isinstance(policy, nn.Module):
        return torch.device("cpu"), torch.float32
    if any(t.is_meta for t in itertools.chain(policy.parameters(), policy.buffers())):
        raise ValueError(
            f"the {type(policy).__name__} policy's parameters are on the meta device (shapes without values): load its "
            "weights first, e.g. policy.to_empty(device='cpu') then policy.load_state_dict(...)"
        )
    for parameter in policy.parameters():
        return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.float32


POLICY_CLASSES: dict[str, Callable[..., nn.Module]] = {"MLPPolicy": MLPPolicy}


def save_policy(policy: nn.Module, path: str | os.PathLike, record: dict[str, Any] | None = None) -> Path:
    """Write ``policy`` to the folder ``path``: ``model.safetensors`` and ``config.json``.

    The policy must be a registered class (see ``POLICY_CLASSES``) with a ``config`` dict of its
    constructor arguments. ``record`` (training recipe, measured success, ...) is stored alongside.
    """
    name = type(policy).__name__
    if name not in POLICY_CLASSES or not hasattr(policy, "config"):
        raise TypeError(f"cannot save a {name}: register its class in POLICY_CLASSES and give it a `config` dict")
    config = {"format_version": FORMAT_VERSION, "class": name, "kwargs": policy.config, "record": record or {}}
    with atomic_path(path, FolderKind("saved policy", {"format_version", "class", "kwargs", "record"})) as tmp:
        tmp.mkdir()
        write_weights(policy.state_dict(), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(path)


def load_policy(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Read a policy written by :func:`save_policy`; returns the module (eval mode) and its record.

    Raises:
        FileNotFoundError: ``path`` is not a saved policy folder.
        ValueError: a file of it is damaged, of another format, or does not fit its class.
    """
    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved policy: it needs config.json and model.safetensors")
    config = read_json_object(config_file)
    if config.get("format_version") != FORMAT_VERSION or config.get("class") not in POLICY_CLASSES:
        raise ValueError(
            f"{path} holds an incompatible policy checkpoint (format {config.get('format_version')!r}, "
            f"class {config.get('class')!r}); this version reads format {FORMAT_VERSION} of {sorted(POLICY_CLASSES)}"
        )
    check_keys(config, config_file, ("format_version", "class", "kwargs", "record"))
    if not isinstance(config["kwargs"], dict) or not isinstance(config["record"], dict):
        raise ValueError(f"{config_file}: 'kwargs' and 'record' must be JSON objects")
    try:
        policy = new_policy(config["class"], config["kwargs"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{config_file}: its kwargs do not build a {config['class']}: {err}") from err
    load_weights(policy, weights_file)
    return policy.eval(), config["record"]


def build_policy(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """Instantiate the registered policy class ``name`` with ``kwargs`` and load ``state`` (eval mode)."""
    policy = new_policy(name, kwargs)
    policy.load_state_dict(state)
    return policy.eval()


def new_policy(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A freshly initialised instance of the registered policy class ``name`` built with ``kwargs``."""
    kwargs = dict(kwargs)
    if "hidden" in kwargs:
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return POLICY_CLASSES[name](**kwargs)
