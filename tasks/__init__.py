"""Task suites (Meta-World and a toy suite), rollout collection and rendering.

Installed as ``improver.tasks``.
"""

from .registry import SUITES, make_suite, register_suite, unregister_suite
from .rendering import RenderBackendError, RenderConfig
from .rollout import episode_seeds, relabel, rollout
from .suite import Suite, Task

__all__ = ["SUITES", "RenderBackendError", "RenderConfig", "Suite", "Task", "episode_seeds", "make_suite", "register_suite", "relabel", "rollout", "unregister_suite"]
