"""policy-improver: a learned policy-improvement operator, applied like an RL update."""

from .types import Policy, TaskInfo, Trajectory

__version__ = "0.1.0"
__all__ = ["Policy", "TaskInfo", "Trajectory", "__version__"]
