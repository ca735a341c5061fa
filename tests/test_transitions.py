"""Experience from outside the package's rollout: TrajectoryBuilder and ExplorationNoise."""

from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch

import improver
from improver.augment.noise import ExplorationNoise
from improver.policies import MLPPolicy
from improver.tasks import episode_seeds, rollout
from improver.transitions import TrajectoryBuilder, unknown_task
from improver.types import TaskInfo

OBS = np.arange(4, dtype=np.float64)
ACT = np.array([0.5, -0.5])


def test_steps_of_two_episodes_are_padded_and_masked():
    builder = TrajectoryBuilder()
    for t in range(3):
        assert builder.add(OBS + t, ACT, float(t), False, t == 2, {"success": float(t == 1)}) is (t == 2)
    builder.add(OBS, ACT, 5.0, True, info={"success": 0.0})
    assert builder.num_episodes == 2
    trajectory = builder.trajectory()
    assert trajectory.observations.shape == (2, 3, 4) and trajectory.actions.shape == (2, 3, 2)
    assert trajectory.observations.dtype == torch.float32
    assert trajectory.mask.tolist() == [[True, True, True], [True, False, False]]
    assert trajectory.rewards.tolist() == [[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]]
    assert trajectory.successes.tolist() == [[False, True, False], [False, False, False]]
    assert trajectory.success.tolist() == [True, False] and trajectory.lengths.tolist() == [3, 1]
    assert torch.equal(trajectory.observations[0, 2], torch.tensor(OBS + 2, dtype=torch.float32))
    assert not trajectory.observations[1, 1:].any()  # padding is zero
    assert trajectory.tasks == (unknown_task(0), unknown_task(0))
    assert builder.num_episodes == 0  # trajectory() hands them over


@pytest.mark.parametrize(
    "source, infos, expected",
    [
        ("is_success", [{}, {}, {"is_success": True}], [False, False, True]),
        ("success", [{"success": 1.0}, {}, {"success": 0.0}], [True, False, False]),
        (lambda obs, act, reward, info: reward >= 2 and obs[0] == 2, [{}, {}, {}], [False, False, True]),
        (None, [{"success": 1.0}] * 3, [False, False, False]),
    ],
)
def test_success_comes_from_the_chosen_source(source, infos, expected):
    builder = TrajectoryBuilder(success=source)
    for t, info in enumerate(infos):
        builder.add(OBS + t, ACT, float(t), False, t == 2, info)
    assert builder.trajectory().successes[0].tolist() == expected


def test_a_success_function_gets_an_empty_info_and_a_key_source_needs_one():
    seen = []
    builder = TrajectoryBuilder(success=lambda obs, act, reward, info: seen.append(info) or False)
    builder.add(OBS, ACT, 0.0, True)
    assert seen == [{}]
    with pytest.raises(ValueError, match="no info was given"):
        TrajectoryBuilder(success="success").add(OBS, ACT, 0.0, True)


def test_the_task_records_are_the_given_ones():
    mine = TaskInfo("mine", "fam", "test", 3, 1, 7, (0.1, 0.2), "v2")
    builder = TrajectoryBuilder(task=mine)
    builder.add_batch(np.stack([OBS, OBS]), np.stack([ACT, ACT]), [0.0, 0.0], [True, True], infos=[{}, {}])
    assert builder.trajectory().tasks == (mine, mine)
    other = mine._replace(index=4)
    builder.set_task(other, env=1)
    builder.add_batch(np.stack([OBS, OBS]), np.stack([ACT, ACT]), [0.0, 0.0], [True, True], infos=[{}, {}])
    assert builder.trajectory().tasks == (mine, other)
    per_env = TrajectoryBuilder(task=[mine, other])
    per_env.add(OBS, ACT, 0.0, True, info={}, env=1)
    assert per_env.trajectory().tasks == (other,) and per_env.task(2) == unknown_task(2)


def test_keep_holds_the_latest_episodes_and_clear_forgets():
    builder = TrajectoryBuilder(keep=2)
    for r in range(4):
        builder.add(OBS, ACT, float(r), True, info={})
    assert builder.trajectory(clear=False).rewards[:, 0].tolist() == [2.0, 3.0] and builder.num_episodes == 2
    builder.add(OBS, ACT, 7.0, False, info={})  # a running episode survives clear() ...
    builder.clear()
    builder.add(OBS, ACT, 8.0, True, info={})
    assert builder.trajectory().rewards.tolist() == [[7.0, 8.0]]
    builder.add(OBS, ACT, 7.0, False, info={})  # ... but not clear(running=True)
    builder.clear(running=True)
    builder.add(OBS, ACT, 8.0, True, info={})
    assert builder.trajectory().rewards.tolist() == [[8.0]]


def test_whole_episodes_reward_free_or_not():
    builder = TrajectoryBuilder()
    builder.add_episode(np.zeros((5, 4)), np.zeros((5, 2)), successes=[0, 0, 1, 0, 0])
    builder.add_episode(np.ones((2, 4)), np.ones((2, 2)), infos=[{"success": 1.0}, {}])
    trajectory = builder.trajectory()
    assert trajectory.rewards is None and trajectory.mask.sum(1).tolist() == [5, 2]
    assert trajectory.success.tolist() == [True, True]
    builder.add_episode(np.zeros((2, 4)), np.zeros((2, 2)), np.zeros(2), infos=[{}, {}])
    builder.add_episode(np.zeros((2, 4)), np.zeros((2, 2)), infos=[{}, {}])
    with pytest.raises(ValueError, match="reward-free"):
        builder.trajectory()


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="success must be"):
        TrajectoryBuilder(success="done")
    with pytest.raises(ValueError, match="keep"):
        TrajectoryBuilder(keep=0)
    with pytest.raises(ValueError, match="task must be"):
        TrajectoryBuilder(task=["not a task"])
    builder = TrajectoryBuilder()
    with pytest.raises(ValueError, match="no episode has ended"):
        builder.trajectory()
    with pytest.raises(ValueError, match="add_batch"):
        builder.add(np.zeros((2, 4)), ACT, 0.0, False, info={})
    builder.add(OBS, ACT, 0.0, False, info={})
    with pytest.raises(ValueError, match="earlier steps had 4 and 2"):
        builder.add(np.zeros(5), ACT, 0.0, False, info={})
    with pytest.raises(ValueError, match="one number"):
        builder.add(OBS, ACT, [0.0, 1.0], False, info={})
    with pytest.raises(ValueError, match=r"\[N, obs_dim\]"):
        builder.add_batch(np.zeros((2, 4)), np.zeros((3, 2)), [0.0, 0.0], [False, False])
    with pytest.raises(ValueError, match="2 infos for 1"):
        builder.add_batch(np.zeros((1, 4)), np.zeros((1, 2)), [0.0], [False], infos=[{}, {}])
    with pytest.raises(ValueError, match="T >= 1"):
        builder.add_episode(np.zeros((0, 4)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="rewards must be"):
        builder.add_episode(np.zeros((3, 4)), np.zeros((3, 2)), np.zeros(2), successes=np.zeros(3))
    builder.add(np.full(4, np.nan), ACT, 0.0, True, info={})  # Trajectory names the bad step
    with pytest.raises(ValueError, match=r"observations\[0, 1, 0\]"):
        builder.trajectory()


def test_a_vector_env_in_same_step_mode_gives_what_rollout_gives(toy):
    """Gymnasium's vector info (a dict of arrays, the ended episodes' under final_info) read per env."""
    tasks, seed = toy.tasks("test")[:2], 3
    expected = rollout(toy.expert, tasks, 1, seed=seed, progress=False)
    assert expected.successes[:, -1].all()  # the last step's flag, read from final_info, matters
    make = [partial(lambda task: gym.wrappers.TimeLimit(task.make_env(None), task.max_steps), task) for task in tasks]
    envs = gym.vector.SyncVectorEnv(make, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    experts = [toy.expert.for_task(info) for info in expected.tasks]
    builder = TrajectoryBuilder(task=expected.tasks)
    obs, _ = envs.reset(seed=episode_seeds(seed, 2))
    while builder.num_episodes < 2:
        with torch.no_grad():
            actions = torch.cat([e(torch.as_tensor(row)[None]) for e, row in zip(experts, obs)]).numpy()
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        builder.add_batch(obs, actions, rewards, terminated, truncated, infos)
        obs = next_obs
    envs.close()
    got = builder.trajectory()
    for name in ("observations", "actions", "rewards", "successes", "mask"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert got.tasks == expected.tasks


def test_builder_and_noise_are_public_names():
    assert improver.TrajectoryBuilder is TrajectoryBuilder and improver.ExplorationNoise is ExplorationNoise


# --- ExplorationNoise: the loop's noise for a collection loop of your own -------------------------


def test_exploration_noise_in_an_own_loop_matches_rollout_bit_for_bit(toy):
    task, seed = toy.tasks("test")[0], 5
    torch.manual_seed(0)
    policy = MLPPolicy(4, 2)
    noise = ExplorationNoise(0.3, seed=11)
    expected = rollout(noise.wrap(policy), [task], 2, seed=seed, progress=False)
    for episode, episode_seed in enumerate(episode_seeds(seed, 2)):
        act = noise.for_episode(policy, episode_seed)
        env = task.make_env(None)
        obs, _ = env.reset(seed=episode_seed)
        for t in range(task.max_steps):
            with torch.no_grad():
                action = act(torch.as_tensor(obs)[None])[0].numpy()
            assert np.array_equal(action, expected.actions[episode, t].numpy()), (episode, t)
            obs, *_ = env.step(action)
        env.close()
    assert not torch.equal(expected.actions, rollout(policy, [task], 2, seed=seed, progress=False).actions)


def test_exploration_noise_is_reproducible_by_seed():
    policy = MLPPolicy(4, 2)
    obs = torch.zeros(1, 4)

    def actions(noise, episode):
        act = noise.for_episode(policy, episode)
        return torch.cat([act(obs) for _ in range(5)])

    first = actions(ExplorationNoise(0.2, seed=1), 0)
    assert torch.equal(first, actions(ExplorationNoise(0.2, seed=1), 0))
    assert not torch.equal(first, actions(ExplorationNoise(0.2, seed=2), 0))
    assert not torch.equal(first, actions(ExplorationNoise(0.2, seed=1), 1))
    assert first.abs().max() <= 1.0 and len({tuple(row.tolist()) for row in first}) == 5  # fresh noise each step, clipped
    assert ExplorationNoise(0.0).for_episode(policy, 0) is policy and ExplorationNoise(0.0).wrap(policy) is policy
    with pytest.raises(ValueError, match="std"):
        ExplorationNoise(-0.1)
    with pytest.raises(ValueError, match="seed"):
        ExplorationNoise(0.1, seed=1.5)
