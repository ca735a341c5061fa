import numpy as np
import pytest
import torch

from improver.policies import MLPPolicy
from improver.tasks import RenderConfig, make_suite, rollout


def test_registry_rejects_bad_names():
    with pytest.raises(ValueError, match="unknown suite"):
        make_suite("Atari")
    with pytest.raises(ValueError, match="unknown toy suite"):
        make_suite("toy:maze")
    with pytest.raises(ValueError, match="needs a task"):
        make_suite("ML1")
    with pytest.raises(ValueError, match="takes no"):
        make_suite("ML10:push-v3")


def test_unknown_split(toy):
    with pytest.raises(ValueError, match="no split 'val'"):
        toy.tasks("val")


def test_held_out_goals_never_appear_in_train(toy):
    train = {toy_goal(t) for t in toy.tasks("train")}
    test = [toy_goal(t) for t in toy.tasks("test")]
    assert len(test) == 10 and len(train) == 50
    assert not train.intersection(test)


def toy_goal(task):
    return tuple(task.make_env().goal.round(6))


def test_expert_succeeds_without_seeing_the_goal(toy):
    traj = rollout(toy.expert, toy.tasks("test"), 2, progress=False)
    assert traj.success.all()
    goals = torch.tensor([info.parameters for info in traj.tasks])
    # The learner's observation is position and velocity only: the goal appears nowhere.
    assert traj.observations.shape[-1] == 4
    assert not torch.isclose(traj.observations[:, 0, :2], goals, atol=1e-3).all(dim=1).any()


def test_same_seeds_give_identical_episodes_and_new_seeds_differ(toy):
    noisy = lambda obs: torch.sin(obs[:, :2] * 7)  # noqa: E731
    a = rollout(noisy, toy.tasks("train")[:3], 2, seed=5, progress=False)
    b = rollout(noisy, make_suite("toy:reach2d", seed=0).tasks("train")[:3], 2, seed=5, progress=False)
    c = rollout(noisy, toy.tasks("train")[:3], 2, seed=6, progress=False)
    assert torch.equal(a.observations, b.observations) and torch.equal(a.rewards, b.rewards)
    assert not torch.equal(a.observations[:, 0], c.observations[:, 0])
    assert make_suite("toy:reach2d", seed=1).tasks("train")[0].make_env().goal.tolist() != toy.tasks("train")[0].make_env().goal.tolist()


def test_stop_on_success_ends_episodes_early(toy):
    traj = rollout(toy.expert, toy.tasks("test"), 1, stop_on_success=True, progress=False)
    assert traj.success.all()
    assert (traj.lengths < 40).all()
    last = traj.lengths - 1
    assert traj.successes[torch.arange(traj.num_episodes), last].all()


def test_module_policy_on_its_own_dtype(toy):
    policy = MLPPolicy(4, 2).double()
    traj = rollout(policy, toy.tasks("test")[:2], 1, max_steps=7, progress=False)
    assert traj.observations.shape == (2, 7, 4) and traj.actions.dtype == torch.float32
    assert (traj.actions.abs() <= 1).all()


def test_wrong_action_shape_is_a_clear_error(toy):
    with pytest.raises(ValueError, match=r"actions of shape \(3, 3\).*expects \(3, 2\)"):
        rollout(lambda obs: torch.zeros(len(obs), 3), toy.tasks("test")[:3], 1, progress=False)
    with pytest.raises(ValueError, match="could not act on observations"):
        rollout(MLPPolicy(39, 2), toy.tasks("test")[:1], 1, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        rollout(lambda obs: torch.full((len(obs), 2), float("nan")), toy.tasks("test")[:1], 1, progress=False)


def test_render_size_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        RenderConfig(size=0)
    with pytest.raises(ValueError, match="positive"):
        RenderConfig(every=-1)


def test_frames_at_a_stride_blank_after_the_end(toy):
    traj = rollout(toy.expert, toy.tasks("test")[:2], 1, stop_on_success=True, render=RenderConfig(every=3, size=16), progress=False)
    assert traj.frames.dtype == torch.uint8 and traj.frames.shape[2:] == (3, 16, 16)
    assert traj.frame_steps.tolist() == list(range(0, traj.observations.shape[1], 3))
    for e in range(2):
        real = traj.frame_steps < traj.lengths[e]
        assert (traj.frames[e, real].float().std(dim=(1, 2, 3)) > 0).all()
        assert int(traj.frames[e, ~real].sum()) == 0
    # the red point moves between the first two frames
    assert not torch.equal(traj.frames[0, 0], traj.frames[0, 1])


def test_episode_seeds_are_stable():
    from improver.tasks import episode_seeds

    assert episode_seeds(3, 4) == episode_seeds(3, 4)
    assert episode_seeds(3, 4)[:2] == episode_seeds(3, 2)
    assert len(set(episode_seeds(3, 100))) == 100
    assert np.all(np.array(episode_seeds(0, 10)) >= 0)
