import dataclasses
import pickle

import numpy as np
import pytest
from metaworld.policies.sawyer_push_v3_policy import SawyerPushV3Policy
from metaworld.policies.sawyer_pick_place_v3_policy import SawyerPickPlaceV3Policy
from metaworld.policies.sawyer_reach_v3_policy import SawyerReachV3Policy
from metaworld.policies.sawyer_window_open_v3_policy import SawyerWindowOpenV3Policy
import torch

from improver.tasks import RenderConfig, make_suite, rollout
from improver.tasks.expert_check import JUMP_LIMIT, expert_check, format_expert_check
from improver.tasks.metaworld_suite import GOAL_SLICE, MetaWorldExpert, SmoothedPolicy, SmoothPushPolicy


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
    goals = np.array([info.parameters for info in traj.tasks])
    assert np.abs(goals).sum() > 0 and not np.allclose(goals[0], goals[1])
    assert {info.reward_function_version for info in traj.tasks} == {"v2"}


def test_reach_expert_aims_the_fingertips_not_the_hand():
    reach = make_suite("ML1:reach-v3")
    traj = rollout(reach.expert, reach.tasks("test")[:2], 1, max_steps=150, progress=False)
    assert traj.success.all()
    # Success is measured at the fingertips' centre, 4.5 cm below the observed hand position.
    hand_above_goal = traj.observations[:, -1, :3] - torch.tensor(np.array([info.parameters for info in traj.tasks]), dtype=torch.float32)
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


class _HoverThenDrop:
    """A scripted policy of Meta-World's kind: hover 20 cm above the object until the hand is within
    4 cm of it in xy, then drop onto it (its action jumps by 2 in z at the switch)."""

    def get_action(self, obs):
        hand, obj = obs[:3], obs[4:7]
        target = obj + (np.array([0.0, 0.0, 0.2]) if np.linalg.norm(hand[:2] - obj[:2]) > 0.04 else 0.0)
        return np.append(10.0 * (target - hand), 0.0)


def _obs(hand, obj):
    obs = np.zeros(39)
    obs[:3], obs[4:7], obs[GOAL_SLICE] = hand, obj, [0.3, 0.8, 0.1]
    return obs


def test_smoothed_policy_is_continuous_at_a_phase_switch():
    obj = np.array([0.0, 0.7, 0.05])
    at_switch = _obs(obj + [0.0395, 0.0, 0.1], obj)  # 0.5 mm inside the 4 cm switch
    nudged = at_switch + np.eye(39)[0] * 1e-3  # 0.5 mm outside
    raw = _HoverThenDrop()
    assert np.abs(raw.get_action(nudged) - raw.get_action(at_switch)).max() > 1.5
    smooth = SmoothedPolicy(raw, scale=0.01, samples=16, seed=0)
    assert np.abs(smooth.get_action(nudged) - smooth.get_action(at_switch)).max() < 0.3
    # A ramp: from "drop" to "hover" over a few cm, in steps no larger than a few samples' share.
    z = np.array([smooth.get_action(_obs(obj + [x, 0.0, 0.1], obj))[2] for x in np.linspace(0.0, 0.08, 81)])
    assert z[0] < -0.8 and z[-1] > 0.8 and np.abs(np.diff(z)).max() < 0.3


def test_smoothed_policy_is_deterministic_and_matches_the_scripted_one_far_from_switches():
    obj = np.array([0.0, 0.7, 0.05])
    far = _obs(obj + [0.0, 0.0, 0.02], obj)  # right above the object: 4 cm from the switch
    first = SmoothedPolicy(_HoverThenDrop(), scale=0.005, seed=3).get_action(far)
    again = SmoothedPolicy(_HoverThenDrop(), scale=0.005, seed=3)
    assert np.array_equal(first, again.get_action(far)) and np.array_equal(first, again.get_action(far))
    np.testing.assert_allclose(first, _HoverThenDrop().get_action(far), atol=1e-9)  # opposite offsets cancel
    other_seed = SmoothedPolicy(_HoverThenDrop(), scale=0.005, seed=4).get_action(_obs(obj + [0.04, 0.0, 0.1], obj))
    assert not np.array_equal(other_seed, again.get_action(_obs(obj + [0.04, 0.0, 0.1], obj)))


@pytest.mark.filterwarnings("ignore:Constant")  # Meta-World warns that the env clips its actions
def test_smoothed_policy_rejects_bad_settings_and_leaves_its_input_alone():
    with pytest.raises(ValueError, match="even"):
        SmoothedPolicy(_HoverThenDrop(), scale=0.01, samples=5)
    with pytest.raises(ValueError, match="positive distance"):
        MetaWorldExpert(smoothing=0.0)
    door = MetaWorldExpert().policy("door-open-v3")  # Meta-World's door policy edits the observation it reads
    assert isinstance(door, SmoothedPolicy)
    obs = _obs([0.0, 0.6, 0.2], [0.1, 0.8, 0.15])
    before = obs.copy()
    door.get_action(obs)
    assert np.array_equal(obs, before)


def test_default_expert_smooths_every_family_without_a_hand_written_smooth_policy():
    expert = MetaWorldExpert()
    assert isinstance(expert.policy("push-v3"), SmoothPushPolicy)
    # no family is left raw by name: `improver train` measures which to leave raw (expert.raw(families))
    for family in ("reach-v3", "basketball-v3", "window-open-v3"):
        assert isinstance(expert.policy(family), SmoothedPolicy)
    assert isinstance(expert.raw(["reach-v3"]).policy("reach-v3"), SawyerReachV3Policy)
    assert isinstance(expert.raw().policy("push-v3"), SawyerPushV3Policy)
    assert isinstance(expert.raw().policy("window-open-v3"), SawyerWindowOpenV3Policy)


@pytest.mark.filterwarnings("ignore:Constant")  # Meta-World warns that the env clips its actions
def test_smoothed_metaworld_policy_is_continuous_where_the_scripted_one_switches():
    # Window-open hovers 30 cm above the window handle until the hand is within 4 cm of it in xy.
    handle = np.array([0.1, 0.75, 0.2])
    grip = handle + [-0.03, -0.03, -0.08]
    line = [_obs(grip + [x, 0.0, 0.1], handle) for x in np.linspace(0.0, 0.08, 81)]  # 1 mm apart, across the switch
    raw, smooth = MetaWorldExpert(smoothing=None).policy("window-open-v3"), MetaWorldExpert().policy("window-open-v3")
    raw_z = np.array([np.clip(raw.get_action(obs.copy()), -1, 1)[2] for obs in line])
    smooth_z = np.array([smooth.get_action(obs)[2] for obs in line])
    assert np.abs(np.diff(raw_z)).max() == 2.0  # from "drop" to "hover" in one step
    assert smooth_z[0] == -1.0 and smooth_z[-1] == 1.0 and np.abs(np.diff(smooth_z)).max() <= 0.5


def test_expert_check_reports_the_scripted_jump_and_the_smoothed_fix():
    suite = make_suite("ML1:window-open-v3", seed=0)
    check = expert_check(suite, tasks=1, episodes=1)["window-open-v3"]
    assert check.expert.success == check.raw.success == 1.0
    assert check.raw.jump_max > 1.0 > JUMP_LIMIT > check.expert.jump_max  # the raw switch; the smoothed ramp
    assert 0 < check.raw.jump_p95 < 0.1 and check.expert.steps > 20
    assert check.problem is None
    table = format_expert_check({"window-open-v3": check})
    assert "window-open-v3" in table and "raw_jump_max" in table
    raw_suite = dataclasses.replace(suite, expert=MetaWorldExpert().raw())
    assert "jumps by up to" in expert_check(raw_suite, tasks=1, episodes=1)["window-open-v3"].problem


def test_expert_check_on_a_suite_without_a_raw_expert(toy):
    check = expert_check(toy, tasks=2, episodes=1)["reach2d"]
    assert check.raw is None and check.problem is None
    assert check.expert.success == 1.0 and 0 < check.expert.jump_max < 0.05  # a gain of 10 times 1 mm
    with pytest.raises(ValueError, match="positive"):
        expert_check(toy, tasks=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["window-open-v3", "coffee-push-v3", "assembly-v3", "bin-picking-v3", "pick-place-wall-v3", "handle-press-v3"])
def test_smoothed_experts_keep_success_and_lose_their_jumps(family):
    check = expert_check(make_suite(f"ML1:{family}", seed=0), tasks=5, episodes=2)[family]
    assert check.expert.success >= check.raw.success - 0.1, check
    assert check.raw.jump_max > 1.0 > JUMP_LIMIT > check.expert.jump_max, check
    assert check.problem is None
