import pytest
import torch

from improver.types import VALUE_LIMIT, TaskInfo, Trajectory


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
        (dict(rewards=torch.full((2, 5), float("nan"))), r"rewards\[0, 0\] \(episode 0, step 0\) is nan"),
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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30, -2e6])
@pytest.mark.parametrize("name", ["observations", "actions", "rewards"])
def test_non_finite_or_huge_values_on_real_steps_are_refused_by_field_episode_and_step(name, value):
    fields = {"observations": torch.randn(2, 5, 4), "actions": torch.randn(2, 5, 2), "rewards": torch.randn(2, 5)}
    fields[name][1, 2] = value  # episode 1, step 2: a real step
    with pytest.raises(ValueError, match=rf"{name}\[1, 2.*\(episode 1, step 2\) is .*within \+-1e\+06"):
        make(lengths=[3, 4], **fields)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_anything_on_padded_steps_is_allowed_and_stays_out_of_returns(value):
    obs, rewards = torch.randn(2, 5, 4), torch.ones(2, 5)
    obs[0, 4], rewards[0, 4] = value, value
    t = make(lengths=[4, 5], observations=obs, rewards=rewards)
    assert t.returns.tolist() == [4.0, 5.0]


def test_values_at_the_limit_are_allowed():
    assert make(observations=torch.full((2, 5, 4), VALUE_LIMIT), rewards=torch.full((2, 5), -VALUE_LIMIT)).num_episodes == 2


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


def test_public_names_import_from_the_package():
    import improver
    from improver.loop import improve
    from improver.operator import Improver

    assert improver.Improver is Improver and improver.improve is improve
    assert set(improver.__all__) <= set(dir(improver))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        improver.Nope
