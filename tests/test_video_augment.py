import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from improver.augment.video import VideoAugment, VideoAugmentConfig

SIZE = (24, 20)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_clips(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=seeded(seed), dtype=torch.uint8)


@pytest.fixture(scope="module")
def augment():
    return VideoAugment(VideoAugmentConfig(size=SIZE))


def test_output_is_uint8_at_the_output_size(augment):
    assert augment(random_clips(5, 3, 32, 40), seeded(0)).shape == (5, 3, *SIZE)
    out = augment(random_clips(2, 5, 3, 32, 40), seeded(0))
    assert out.shape == (2, 5, 3, *SIZE) and out.dtype == torch.uint8
    assert augment(random_clips(2, 5, 1, 16, 16), seeded(0)).shape == (2, 5, 1, *SIZE)


def test_same_seed_same_output_different_seed_different_output(augment):
    clips = random_clips(3, 4, 3, 32, 32)
    a, b, c = augment(clips, seeded(7)), augment(clips, seeded(7)), augment(clips, seeded(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_global_rng_is_untouched(augment):
    clips = random_clips(2, 4, 3, 32, 32)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    augment(clips, seeded(0))
    assert torch.equal(torch.get_rng_state(), before)
    # Seeding the global RNG must not change what a given generator produces.
    torch.manual_seed(0)
    x = augment(clips, seeded(5))
    torch.manual_seed(1)
    assert torch.equal(augment(clips, seeded(5)), x)


def test_identical_frames_stay_identical_and_clips_differ(augment):
    frame = random_clips(1, 3, 32, 32)
    clips = frame.expand(6, 8, 3, 32, 32)  # 6 clips of 8 copies of one frame
    out = augment(clips, seeded(0))
    assert torch.equal(out, out[:, :1].expand_as(out))
    assert len({out[b, 0].numpy().tobytes() for b in range(6)}) == 6


def test_every_frame_gets_the_clip_parameters(augment):
    clip = random_clips(6, 3, 32, 40)
    out = augment(clip, seeded(3))
    # A one-frame clip drawn with the same seed gets the same parameters; so must each frame.
    for f in range(6):
        assert torch.equal(out[f : f + 1], augment(clip[f : f + 1], seeded(3)))


def test_frames_offset_in_brightness_share_one_crop_box():
    crop_only = VideoAugment(VideoAugmentConfig(size=SIZE, scale=(0.3, 0.5), crop_p=1.0, jitter_p=0.0))
    base = random_clips(1, 3, 32, 32).clamp(max=200)
    clip = torch.cat([base + 10 * k for k in range(5)])
    for seed in range(5):
        out = crop_only(clip, seeded(seed)).int()
        # Resizing is linear, so one crop box keeps the offsets (up to uint8 rounding);
        # a different box on this noise would move pixels by tens of levels.
        offsets = out - out[:1]
        expected = 10 * torch.arange(5).view(5, 1, 1, 1)
        assert (offsets - expected).abs().max() <= 1


def test_disabled_only_resizes():
    clips = random_clips(2, 3, 3, 32, 40)
    plain = VideoAugment(VideoAugmentConfig(size=SIZE, enabled=False))
    assert torch.equal(plain(clips), v2.Resize(list(SIZE), antialias=True)(clips))
    assert torch.equal(plain(clips, seeded(0)), plain(clips, seeded(1)))


class Clips(Dataset):
    def __init__(self, augment: VideoAugment, clips: torch.Tensor) -> None:
        self.augment, self.clips = augment, clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.augment(self.clips[i], seeded(i))


def test_works_in_dataloader_workers(augment):
    clips = random_clips(8, 4, 3, 32, 32)
    copy = pickle.loads(pickle.dumps(augment))
    assert torch.equal(copy(clips, seeded(0)), augment(clips, seeded(0)))
    expected = torch.stack([augment(clips[i], seeded(i)) for i in range(8)])
    loaded = torch.cat(list(DataLoader(Clips(augment, clips), batch_size=3, num_workers=2)))
    assert torch.equal(loaded, expected)


@pytest.mark.parametrize(
    "clip",
    [
        torch.zeros(4, 3, 8, 8),  # float
        torch.zeros(3, 8, 8, dtype=torch.uint8),  # one frame without the frame dimension
        torch.zeros(1, 1, 4, 3, 8, 8, dtype=torch.uint8),  # six dimensions
        torch.zeros(4, 2, 8, 8, dtype=torch.uint8),  # two channels
        torch.zeros(4, 8, 8, 3, dtype=torch.uint8),  # channels last
        torch.zeros(0, 3, 8, 8, dtype=torch.uint8),  # no frames
        torch.zeros(4, 3, 0, 8, dtype=torch.uint8),  # no rows
    ],
)
def test_bad_clips_raise(augment, clip):
    with pytest.raises(ValueError):
        augment(clip)


def test_non_tensor_clip_raises(augment):
    with pytest.raises(ValueError, match="torch.Tensor"):
        augment([[0]])


@pytest.mark.parametrize(
    "settings",
    [
        {"size": (0, 64)},
        {"size": (64, -1)},
        {"size": (64,)},
        {"scale": (0.0, 1.0)},
        {"scale": (0.9, 0.8)},
        {"scale": (0.8, 1.2)},
        {"ratio": (0.0, 1.0)},
        {"brightness": -0.1},
        {"hue": 0.6},
        {"crop_p": 1.5},
        {"jitter_p": float("nan")},
    ],
)
def test_bad_config_raises(settings):
    with pytest.raises(ValueError):
        VideoAugmentConfig(**settings)
