"""Headless rendering: pick a working OpenGL backend and fast scene settings for MuJoCo.

MuJoCo and PyOpenGL read ``MUJOCO_GL`` / ``PYOPENGL_PLATFORM`` when they are first imported,
so :func:`configure_gl_backend` must run before anything imports ``mujoco``; the Meta-World
suite calls it before its lazy import.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

INSTALL_HINT = (
    "No headless OpenGL backend works on this machine. On CPU install the software GL "
    "(`apt-get install libosmesa6`, then MUJOCO_GL=osmesa), or on a GPU machine use EGL "
    "(`apt-get install libegl1`, then MUJOCO_GL=egl)."
)


class RenderBackendError(RuntimeError):
    """No OpenGL backend could render; the message says what to install."""


@dataclass(frozen=True)
class RenderConfig:
    """How to render frames during a rollout.

    Attributes:
        every: Render one frame every ``every`` steps (step 0 included).
        size: Frame height and width in pixels.
        camera: Meta-World camera name (``corner``, ``corner2``, ``corner3``, ``topview``, ...).
        fast: Turn off shadows, reflections and multisampling (about 9x faster on CPU at 64x64).
    """

    every: int = 10
    size: int = 64
    camera: str = "corner3"
    fast: bool = True

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"render size must be a positive number of pixels; got {self.size}")
        if self.every <= 0:
            raise ValueError(f"render stride `every` must be positive; got {self.every}")


def _has_gpu() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/dev/dri/renderD*"))


def choose_gl_backend() -> str | None:
    """Return the backend to use: the user's ``MUJOCO_GL``, else EGL on a GPU machine, else OSMesa.

    Returns ``None`` when no backend library is installed.
    """
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"]
    if _has_gpu() and ctypes.util.find_library("EGL"):
        return "egl"
    if ctypes.util.find_library("OSMesa"):
        return "osmesa"
    return None


def _preload_triton() -> None:
    # torch imports triton lazily (building an optimizer does). Triton's bundled LLVM segfaults
    # when Mesa's LLVM (OSMesa or EGL on CPU) is already in the process, so it must load first.
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton")


def configure_gl_backend() -> str | None:
    """Set ``MUJOCO_GL`` and ``PYOPENGL_PLATFORM`` (unless the user did) and return the backend.

    Call before ``mujoco`` is imported; it also loads ``triton`` first when installed (see above).
    """
    _preload_triton()
    backend = choose_gl_backend()
    if backend is not None:
        os.environ.setdefault("MUJOCO_GL", backend)
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def prepare_mujoco_env(env: Any, config: RenderConfig) -> None:
    """Apply ``config``'s scene settings to a Gymnasium ``MujocoEnv`` before its first frame.

    Multisampling is a property of the offscreen buffer, so it is switched off on the model
    before the renderer creates that buffer; shadows and reflections are scene flags.
    """
    import mujoco

    if config.fast:
        env.model.vis.quality.offsamples = 0
    try:
        viewer = env.mujoco_renderer._get_viewer("rgb_array")
    except Exception as err:  # the GL libraries raise many types; all mean the same to the user
        raise RenderBackendError(f"{INSTALL_HINT} (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: {err})") from err
    if config.fast:
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


def to_chw(frame: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 to ``[3, H, W]`` uint8, copying so MuJoCo's buffer can be reused."""
    return np.ascontiguousarray(frame.transpose(2, 0, 1))
