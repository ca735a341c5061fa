"""The files the package saves: checked reads of JSON records and safetensors weights, and the weights' writer.

Every checkpoint the package reads goes through here, so a damaged, truncated or hand-edited
file becomes a ``ValueError`` naming the file and what is wrong with it, never a raw parser error
and never code execution (safetensors and JSON cannot run code; nothing here unpickles).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``path`` is not UTF-8 JSON, or holds JSON that is not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is damaged: restore or regenerate it") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object; it holds a {type(value).__name__}")
    return value


def check_keys(record: dict[str, Any], path: str | Path, required: Collection[str], optional: Collection[str] = ()) -> None:
    """Raise ``ValueError`` naming ``path`` if ``record`` lacks a ``required`` key or has one outside ``required`` and ``optional``."""
    missing = sorted(set(required) - record.keys())
    unknown = sorted(record.keys() - set(required) - set(optional))
    if missing or unknown:
        parts = ([f"lacks {missing}"] if missing else []) + ([f"has unknown keys {unknown}"] if unknown else [])
        raise ValueError(f"{path} {' and '.join(parts)}; it was not written by this version of policy-improver, or was edited")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (on the CPU).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is empty, truncated or not safetensors (e.g. a header larger than the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); the file is damaged or truncated: restore or regenerate it") from err


def cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` detached, on the CPU and contiguous, as safetensors stores them."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def write_weights(tensors: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``tensors`` (e.g. a state dict, wherever its tensors live) to the safetensors file ``path``; see :func:`read_weights`."""
    save_file(cpu_tensors(tensors), path)


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load the safetensors file ``path`` into ``module``; ``ValueError`` naming the file if the tensors do not fit."""
    try:
        module.load_state_dict(read_weights(path))
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit the architecture in config.json: {err}") from err
