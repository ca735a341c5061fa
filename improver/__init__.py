"""policy-improver: a learned policy-improvement operator, applied like an RL update.

    import improver
    model = improver.Improver.from_pretrained("pretrained/reach-v3/improver")
    task = improver.make_suite("ML1:reach-v3").tasks("test")[0]
    policy, rows = improver.improve(model, my_policy, task)

The public names below are imported on first use, so ``import improver`` stays light (the
Meta-World suites, for one, load MuJoCo).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module (under ``improver``) that defines it
_LAZY = {
    "Policy": "types",
    "TaskInfo": "types",
    "Trajectory": "types",
    "Improver": "operator",
    "BehaviourPolicy": "operator",
    "NetworkConfig": "network",
    "LoopSettings": "loop_settings",
    "improve": "loop",
    "improvement_loop": "loop",
    "MLPPolicy": "policies",
    "save_policy": "policies",
    "load_policy": "policies",
    "make_suite": "tasks",
    "rollout": "tasks",
    "RenderConfig": "tasks",
    "MetaTrainConfig": "meta_train",
    "build_improver": "meta_train",
    "TaskInference": "task_inference",
    "TrajectoryBuilder": "transitions",
    "ExplorationNoise": "augment.noise",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'improver' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
