"""Write rendered episodes as video files (MP4 through imageio-ffmpeg, or GIF)."""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch

from improver.io import atomic_path
from improver.types import Trajectory

VIDEO_SUFFIXES = (".mp4", ".gif")


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: int = 20) -> Path:
    """Write ``frames`` ``[F, C, H, W]`` uint8 to ``path`` (``.mp4`` or ``.gif``), atomically."""
    path = Path(path)
    if path.suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"video path must end in one of {VIDEO_SUFFIXES}; got {path.name!r}")
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[0] == 0:
        raise ValueError(f"frames must be a non-empty uint8 [F, C, H, W] tensor; got {frames.dtype} {tuple(frames.shape)}")
    images = [np.ascontiguousarray(f.permute(1, 2, 0).numpy()) for f in frames]
    with atomic_path(path) as tmp:
        if path.suffix == ".mp4":
            # macro_block_size=1 keeps small frames (e.g. 64x64) at their size instead of resizing.
            imageio.mimwrite(tmp, images, fps=fps, macro_block_size=1)
        else:
            imageio.mimwrite(tmp, images, duration=1000 / fps, loop=0)
    return path


def episode_frames(trajectory: Trajectory, episode: int = 0) -> torch.Tensor:
    """The real (not padded) frames ``[F, C, H, W]`` of one episode."""
    if trajectory.frames is None:
        raise ValueError("this trajectory was collected without rendering; pass render=RenderConfig(...)")
    keep = trajectory.frame_steps < trajectory.lengths[episode]
    return trajectory.frames[episode, keep]
