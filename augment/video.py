"""Temporally consistent video augmentation: random resized crop and colour jitter per clip.

Every frame of a clip gets the same crop box and the same colour change, so motion between
frames is preserved; different clips of a batch get different parameters. The random
parameters come from a ``torch.Generator`` (one seed per clip), never from torch's global RNG,
so results are reproducible and the caller's random stream is left as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

# Seeds span the int64 range so that clips of a batch practically never share one.
_SEED_BOUND = 2**63 - 1


@dataclass(frozen=True)
class VideoAugmentConfig:
    """Settings of :class:`VideoAugment`; the defaults are mild enough to keep the scene readable."""

    size: tuple[int, int] = (64, 64)
    """Output ``(height, width)`` in pixels."""
    scale: tuple[float, float] = (0.8, 1.0)
    """Range of the crop's area, as a fraction of the frame's area."""
    ratio: tuple[float, float] = (0.9, 1.1)
    """Range of the crop's aspect ratio (width / height), before resizing to ``size``."""
    crop_p: float = 0.8
    """Probability that a clip is cropped; otherwise the whole frame is resized to ``size``."""
    brightness: float = 0.2
    """Brightness factor drawn from ``[1 - brightness, 1 + brightness]``."""
    contrast: float = 0.2
    """Contrast factor drawn from ``[1 - contrast, 1 + contrast]``."""
    saturation: float = 0.2
    """Saturation factor drawn from ``[1 - saturation, 1 + saturation]`` (no effect on grey frames)."""
    hue: float = 0.02
    """Hue shift drawn from ``[-hue, hue]``, in turns of the colour wheel; at most 0.5."""
    jitter_p: float = 0.8
    """Probability that a clip's colours are jittered."""
    enabled: bool = True
    """If False, only resize to ``size``: no randomness, e.g. for evaluation."""

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(not isinstance(s, int) or s <= 0 for s in self.size):
            raise ValueError(f"size must be a positive (height, width) in pixels; got {self.size}")
        _check_range("scale", self.scale, upper=1.0)
        _check_range("ratio", self.ratio, upper=math.inf)
        for name in ("brightness", "contrast", "saturation"):
            _check_number(name, getattr(self, name), 0.0, math.inf)
        _check_number("hue", self.hue, 0.0, 0.5)
        _check_number("crop_p", self.crop_p, 0.0, 1.0)
        _check_number("jitter_p", self.jitter_p, 0.0, 1.0)


def _check_number(name: str, value: float, lower: float, upper: float) -> None:
    if not (math.isfinite(value) and lower <= value <= upper):
        raise ValueError(f"{name} must be a finite number in [{lower}, {upper}]; got {value}")


def _check_range(name: str, value: tuple[float, float], upper: float) -> None:
    if len(value) != 2 or not (0 < value[0] <= value[1] <= upper) or not math.isfinite(value[1]):
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= {upper}; got {value}")


class VideoAugment:
    """Augment uint8 clips with one set of random crop and colour parameters per clip.

    Picklable, so it can run inside ``DataLoader`` workers.

    Example:
        >>> augment = VideoAugment(VideoAugmentConfig(size=(64, 64)))
        >>> out = augment(trajectory.frames, torch.Generator().manual_seed(0))  # [B, F, 3, 64, 64]
    """

    def __init__(self, config: VideoAugmentConfig = VideoAugmentConfig()) -> None:
        """Build the transform pipeline.

        Args:
            config: Output size, crop and colour-jitter settings.
        """
        self.config = config
        resize = v2.Resize(list(config.size), antialias=True)
        if config.enabled:
            crop = v2.RandomResizedCrop(list(config.size), scale=config.scale, ratio=config.ratio, antialias=True)
            jitter = v2.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue)
            # Resize after the optional crop gives every clip the output size; it is a no-op on a cropped clip.
            self.transform = v2.Compose([v2.RandomApply([crop], p=config.crop_p), resize, v2.RandomApply([jitter], p=config.jitter_p)])
        else:
            self.transform = resize

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment one clip ``[F, C, H, W]`` or a batch of clips ``[B, F, C, H, W]``.

        Args:
            clip: uint8 frames with ``C`` 3 (RGB) or 1 (grey).
            generator: Source of one seed per clip. ``None`` draws the seeds from torch's global
                RNG, which ``DataLoader`` seeds differently in each worker and epoch.

        Returns:
            uint8 tensor ``[F, C, h, w]`` or ``[B, F, C, h, w]`` with ``(h, w) = config.size``.

        Raises:
            ValueError: If ``clip`` is not a uint8 tensor, not 4-D or 5-D, has an empty dimension
                or a channel count other than 1 or 3.
        """
        _check_clip(clip)
        if clip.ndim == 4:
            return self._augment_batch(clip.unsqueeze(0), generator).squeeze(0)
        return self._augment_batch(clip, generator)

    def _augment_batch(self, clips: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.config.enabled:
            return self._apply(clips)
        seeds = torch.randint(_SEED_BOUND, (clips.shape[0],), generator=generator).tolist()
        # transforms.v2 samples its parameters from the global CPU RNG; fork it so that seeding
        # it per clip leaves the caller's random stream exactly as it was.
        with torch.random.fork_rng(devices=[]):
            out = []
            for one_clip, seed in zip(clips, seeds):
                torch.manual_seed(seed)
                out.append(self._apply(one_clip))
        return torch.stack(out)

    def _apply(self, frames: torch.Tensor) -> torch.Tensor:
        # As a Video, all leading dimensions share one draw of the parameters, so every frame
        # of the clip gets the same crop box and colour change.
        return self.transform(tv_tensors.Video(frames)).as_subclass(torch.Tensor)


def _check_clip(clip: torch.Tensor) -> None:
    if not isinstance(clip, torch.Tensor):
        raise ValueError(f"clip must be a torch.Tensor; got {type(clip).__name__}")
    if clip.dtype != torch.uint8:
        raise ValueError(f"clip must be uint8; got {clip.dtype}")
    if clip.ndim not in (4, 5):
        raise ValueError(f"clip must be [F, C, H, W] or [B, F, C, H, W]; got shape {tuple(clip.shape)}")
    if clip.shape[-3] not in (1, 3):
        raise ValueError(f"clip must have 1 or 3 channels in dimension -3; got shape {tuple(clip.shape)}")
    if clip.numel() == 0:
        raise ValueError(f"clip has an empty dimension; got shape {tuple(clip.shape)}")
