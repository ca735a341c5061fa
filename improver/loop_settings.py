"""The improvement loop's settings, carried by an improver as Hugging Face models carry a generation config.

Its own module (not ``loop.py``) because ``operator.Improver`` stores them and ``loop`` imports ``operator``.
It imports nothing heavy (no torch), so the ``improver`` command's help can nest :class:`LoopOverrides`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

Mode = Literal["parameters", "behaviour"]
RENAMED = {"goal_exploration": "task_exploration", "wide_goal_exploration": "wide_task_exploration"}
"""Keys of older records and their names now."""


@dataclass(frozen=True)
class LoopSettings:
    """How :func:`improver.loop.improvement_loop` runs an improver; the defaults are a bare improver's.

    An improver saves the settings it was built to be used with (``Improver.loop_settings``), and
    every entry point (``improve``, ``improvement_loop``, ``improver improve``, ``improver demo``,
    ``improver bench improve``, the stable-baselines3 helpers) takes them as its defaults.
    """

    mode: Mode = "parameters"
    """``"parameters"`` (a distilled copy of the policy) or ``"behaviour"`` (act with the improver's head)."""
    exploration: float = 0.0
    """Std of the Gaussian noise on the policy's actions while collecting (spreads the states the task is inferred from)."""
    task_exploration: float = 0.0
    """Behaviour mode: std (in the task parameters' own units) of a per-episode perturbation of the inferred task that the head acts on."""
    wide_task_exploration: float = 0.0
    """Behaviour mode: the task exploration of a step after one whose episodes all failed (0: ``task_exploration``)."""
    memory: int = 1
    """Each step watches the episodes of the last this many steps."""

    def __post_init__(self) -> None:
        if self.mode not in ("parameters", "behaviour"):
            raise ValueError(f"mode must be 'parameters' or 'behaviour'; got {self.mode!r}")
        for name in ("exploration", "task_exploration", "wide_task_exploration"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a non-negative noise level; got {value!r}")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"memory must be at least 1 step; got {self.memory!r}")
        if (self.task_exploration or self.wide_task_exploration) and self.mode != "behaviour":
            raise ValueError(
                f"task_exploration needs mode='behaviour' (got mode {self.mode!r} with task exploration "
                f"{self.task_exploration}, wide {self.wide_task_exploration}): use mode='behaviour' or set both to 0"
            )

    def task_sigma(self, failed: bool) -> float:
        """The task exploration of a step: ``wide_task_exploration`` (or, if 0, ``task_exploration``)
        after a step whose episodes all failed, else ``task_exploration``."""
        return (self.wide_task_exploration or self.task_exploration) if failed else self.task_exploration

    def overridden(
        self,
        mode: Mode | None = None,
        exploration: float | None = None,
        task_exploration: float | None = None,
        wide_task_exploration: float | None = None,
        memory: int | None = None,
    ) -> LoopSettings:
        """These settings with every argument that is not ``None`` in place of its own.

        The task exploration applies to behaviour mode only, so asking for parameters mode drops
        the carried one (an explicit task exploration with parameters mode is refused).
        """
        chosen = mode or self.mode
        carried = asdict(self) if chosen == "behaviour" else {**asdict(self), "task_exploration": 0.0, "wide_task_exploration": 0.0}
        given = {"mode": mode, "exploration": exploration, "task_exploration": task_exploration, "wide_task_exploration": wide_task_exploration, "memory": memory}
        return LoopSettings(**{**carried, **{k: v for k, v in given.items() if v is not None}})

    @classmethod
    def from_record(cls, record: Any, path: str | Path) -> LoopSettings:
        """Settings from their JSON record (``asdict``); ``ValueError`` naming ``path`` if it is not one."""
        if not isinstance(record, dict):
            raise ValueError(f"{path}: loop_settings must be a JSON object; got {type(record).__name__}")
        # Written before task inference had one interface, under the names of RENAMED.
        record = {RENAMED.get(key, key): value for key, value in record.items()}
        from .saved_files import check_keys  # it imports torch, which the settings themselves never need

        check_keys(record, path, (), [f.name for f in fields(cls)])
        try:
            return cls(**record)
        except ValueError as err:
            raise ValueError(f"{path}: its loop_settings are not valid: {err}") from err


@dataclass(frozen=True)
class LoopOverrides:
    """Loop settings to put in place of an improver's own; each left ``None`` is the improver's (its saved ``loop_settings``).

    The command line nests this into every command that runs the loop (``--mode``, ``--exploration``, ...).
    Its fields are those of :class:`LoopSettings`, each optional.
    """

    mode: Mode | None = None
    """Distil into the policy's own parameters, or act with the improver's head (default: the improver's)."""
    exploration: float | None = None
    """Std of the Gaussian noise on actions while collecting (the improver infers the task from the spread; default: the improver's)."""
    task_exploration: float | None = None
    """Behaviour mode: std (task-parameter units, e.g. metres) of a per-episode offset of the task the head acts on (default: the improver's)."""
    wide_task_exploration: float | None = None
    """Behaviour mode: the task exploration of a step after one whose episodes all failed (0: --task-exploration; default: the improver's)."""
    memory: int | None = None
    """Each step watches the episodes of the last this many steps (default: the improver's)."""

    def applied(self, settings: LoopSettings) -> LoopSettings:
        """``settings`` with the overrides given in their place (see :meth:`LoopSettings.overridden`)."""
        return settings.overridden(**asdict(self))
