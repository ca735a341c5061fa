import pytest
import torch

from improver.types import TaskInfo, Trajectory


def info(i: int = 0) -> TaskInfo:
    return TaskInfo("toy:reach2d", "reach2d", "test", i, 0, i, (0.5, 0.5), "toy")


def make(batch=2, steps=5, lengths=None, **overrides) -> Trajectory:
    lengths = lengths or [steps] * batch
    mask = torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]
    fields = dict(
        observations=torch.randn(batch, steps, 4),
        actions=torch.randn(batch, steps, 2),
        rewards=torch.randn(batch, steps),
        successes=torch.zeros(batch, steps, dtype=torch.bool),
        mask=mask,
        tasks=tuple(info(i) for i in range(batch)),
    )
    fields.update(overrides)
    return Trajectory(**fields)


def test_properties_follow_the_mask():
    succ = torch.zeros(2, 5, dtype=torch.bool)
    succ[0, 4] = True  # after episode 0 ended: must not count
    succ[1, 1] = True
    t = make(lengths=[3, 5], successes=succ, rewards=torch.ones(2, 5))
    assert t.lengths.tolist() == [3, 5]
    assert t.success.tolist() == [False, True]
    assert t.returns.tolist() == [3.0, 5.0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(actions=torch.randn(2, 4, 2)), "actions has shape"),
        (dict(observations=torch.randn(2, 5)), r"\[episodes, steps, dim\]"),
        (dict(rewards=torch.full((2, 5), float("nan"))), "rewards contain NaN"),
        (dict(successes=torch.zeros(2, 5)), "bool"),
        (dict(mask=torch.tensor([[True, False, True, True, True]] * 2)), "prefix"),
        (dict(tasks=(info(),)), "task infos"),
        (dict(frames=torch.zeros(2, 1, 3, 8, 8, dtype=torch.uint8)), "together"),
        (dict(frames=torch.zeros(2, 1, 3, 8, 8), frame_steps=torch.tensor([0])), "uint8"),
    ],
)
def test_bad_input_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_nan_on_padded_steps_is_allowed():
    obs = torch.randn(2, 5, 4)
    obs[0, 4] = float("nan")
    assert make(lengths=[4, 5], observations=obs).num_episodes == 2


def test_reward_free_has_no_returns():
    with pytest.raises(ValueError, match="reward-free"):
        make(rewards=None).returns


def test_cat_pads_steps_and_frames():
    a = make(batch=1, steps=3, frames=torch.ones(1, 2, 3, 4, 4, dtype=torch.uint8), frame_steps=torch.tensor([0, 2]))
    b = make(batch=2, steps=6, frames=torch.ones(2, 3, 3, 4, 4, dtype=torch.uint8), frame_steps=torch.tensor([0, 2, 4]))
    c = Trajectory.cat([a, b])
    assert c.observations.shape == (3, 6, 4)
    assert c.lengths.tolist() == [3, 6, 6]
    assert c.frames.shape == (3, 3, 3, 4, 4) and c.frame_steps.tolist() == [0, 2, 4]
    assert int(c.frames[0, 2].sum()) == 0
    with pytest.raises(ValueError, match="with and without frames"):
        Trajectory.cat([a, make()])
