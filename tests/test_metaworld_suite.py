import pickle

import numpy as np
import pytest
from metaworld.policies.sawyer_push_v3_policy import SawyerPushV3Policy
from metaworld.policies.sawyer_pick_place_v3_policy import SawyerPickPlaceV3Policy
import torch

from improver.tasks import RenderConfig, make_suite, rollout
from improver.tasks.metaworld_suite import GOAL_SLICE


def rand_vecs(tasks):
    return [tuple(np.round(pickle.loads(t.build.args[1].data)["rand_vec"], 8)) for t in tasks]


def test_ml1_held_out_goals_are_disjoint_from_train(push):
    train, test = rand_vecs(push.tasks("train")), rand_vecs(push.tasks("test"))
    assert len(train) == len(test) == 50
    assert not set(train) & set(test)


def test_ml10_held_out_families_never_in_train():
    ml10 = make_suite("ML10", seed=0)
    train, test = set(ml10.families["train"]), set(ml10.families["test"])
    assert len(train) == 10 and len(test) == 5
    assert not train & test
    assert {t.family for t in ml10.tasks("test")} == test
    # A dataset of a few tasks sees every family before any family twice.
    first = ml10.first("train", 12)
    assert [t.family for t in first[:10]] == list(ml10.families["train"])
    assert [t.index for t in first[10:]] == [1, 51]
    assert ml10.first("test", None) and len(ml10.first("test", None)) == len(ml10.tasks("test"))


def test_multi_task_suites_have_no_held_out_split():
    with pytest.raises(ValueError, match="no split 'test'"):
        make_suite("MT10").tasks("test")


def test_unknown_metaworld_task():
    with pytest.raises(ValueError, match="unknown Meta-World task 'push-v9'"):
        make_suite("ML1:push-v9")


def test_goal_hidden_yet_expert_succeeds(push):
    traj = rollout(push.expert, push.tasks("test")[:2], 1, stop_on_success=True, progress=False)
    assert traj.success.all(), traj.lengths
    assert torch.count_nonzero(traj.observations[..., GOAL_SLICE]) == 0
    goals = np.array([info.goal for info in traj.tasks])
    assert np.abs(goals).sum() > 0 and not np.allclose(goals[0], goals[1])
    assert {info.reward_function_version for info in traj.tasks} == {"v2"}


def test_reach_expert_aims_the_fingertips_not_the_hand():
    reach = make_suite("ML1:reach-v3")
    traj = rollout(reach.expert, reach.tasks("test")[:2], 1, max_steps=150, progress=False)
    assert traj.success.all()
    # Success is measured at the fingertips' centre, 4.5 cm below the observed hand position.
    hand_above_goal = traj.observations[:, -1, :3] - torch.tensor(np.array([info.goal for info in traj.tasks]), dtype=torch.float32)
    assert torch.allclose(hand_above_goal, torch.tensor([0.0, 0.0, 0.045]).expand(2, 3), atol=0.01), hand_above_goal


@pytest.mark.parametrize("family, scripted_class", [("push-v3", SawyerPushV3Policy), ("pick-place-v3", SawyerPickPlaceV3Policy)])
def test_smooth_experts_are_smooth_and_succeed(family, scripted_class):
    suite = make_suite(f"ML1:{family}", seed=0)
    traj = rollout(suite.expert, suite.tasks("test")[:3], 1, max_steps=120, progress=False)
    assert traj.success.all()
    # Its action moves little when the state moves little: no switch between phases.
    expert = suite.expert.for_task(traj.tasks[0])
    states = traj.observations[0, :100]
    for axis in (0, 1, 2):  # the hand, 1 mm at a time
        nudged = states.clone()
        nudged[:, axis] += 1e-3
        assert (expert(nudged) - expert(states)).abs().max() < 0.2
    scripted = suite.expert.for_task(traj.tasks[0])
    scripted.policy = scripted_class()
    jumps = [(scripted(states + torch.eye(39)[a] * 1e-3) - scripted(states)).abs().max() for a in (0, 1, 2)]
    assert max(jumps) > 0.5  # the scripted policy it replaces does jump


def test_same_suite_seed_and_episode_seed_give_identical_episodes(push):
    def noisy(obs):  # depends on the observation, so any drift would show
        return torch.tanh(obs[:, :4] * 13.0)

    runs = [rollout(noisy, push.tasks("train")[:2], 1, seed=3, max_steps=40, progress=False) for _ in range(2)]
    assert torch.equal(runs[0].observations, runs[1].observations)
    assert torch.equal(runs[0].rewards, runs[1].rewards)
    other = make_suite("ML1:push-v3", seed=1)
    moved = rollout(noisy, other.tasks("train")[:2], 1, seed=3, max_steps=40, progress=False)
    assert not torch.equal(moved.observations[:, 0], runs[0].observations[:, 0])


def test_wrong_action_size_on_metaworld(push):
    with pytest.raises(ValueError, match=r"expects \(1, 4\)"):
        rollout(lambda obs: torch.zeros(len(obs), 2), push.tasks("test")[0], 1, max_steps=3, progress=False)


def test_rendered_frames_show_the_scene(push):
    traj = rollout(push.expert, push.tasks("test")[0], 1, max_steps=30, render=RenderConfig(every=10, size=32), progress=False)
    assert traj.frames.shape == (1, 3, 3, 32, 32)
    assert traj.frame_steps.tolist() == [0, 10, 20]
    assert traj.frames.float().std() > 10  # a real image, not a blank buffer
    assert not torch.equal(traj.frames[0, 0], traj.frames[0, 2])  # the arm moved


def test_gl_backend_choice_respects_the_user(monkeypatch):
    from improver.tasks import rendering

    monkeypatch.setenv("MUJOCO_GL", "egl")
    assert rendering.choose_gl_backend() == "egl"
    monkeypatch.delenv("MUJOCO_GL")
    monkeypatch.setattr(rendering, "_has_gpu", lambda: False)
    monkeypatch.setattr(rendering.ctypes.util, "find_library", lambda name: None)
    assert rendering.choose_gl_backend() is None


@pytest.mark.slow
@pytest.mark.parametrize("family", ["push-v3", "reach-v3", "pick-place-v3"])
def test_expert_success_on_held_out_ml1(family):
    from improver.tasks.evaluation import evaluate

    suite = make_suite(f"ML1:{family}", seed=0)
    _, rows = evaluate(suite.expert, suite, "test", episodes=20)
    assert rows[0]["success"] >= 0.85
