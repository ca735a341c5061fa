"""The loop helper (generator, callbacks, env factories) and the stable-baselines3 integration."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from improver.integrations.envs import ContractWrapper, env_task
from improver.loop import Checkpoint, TaskSampling, JSONLinesLog, LoopStep, StopOnSuccess, TensorBoardLog, improve, improvement_loop
from improver.network import NetworkConfig
from improver.operator import Improver
from improver.policies import MLPPolicy, load_policy
from improver.tasks import RenderConfig, rollout


@pytest.fixture(scope="module")
def improver():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Improver(NetworkConfig(4, 2, width=32), distill_steps=5)


class Mine(nn.Module):
    """An architecture the package does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, obs):
        return torch.tanh(self.b(torch.relu(self.a(obs))))


def test_loop_yields_every_step_and_matches_improve(improver, toy):
    tasks, start = toy.tasks("test")[:2], MLPPolicy(4, 2)
    torch.manual_seed(0)
    states = list(improvement_loop(improver, start, tasks, steps=2, episodes=3, seed=1))
    assert [s.step for s in states] == [0, 1, 2]
    assert all(isinstance(s, LoopStep) and s.experience.observations.shape[0] == 3 for s in states)
    assert [s.metrics["env_steps"] for s in states] == [int(sum(x.experience.lengths.sum() for x in states[: k + 1])) for k in range(3)]
    assert states[0].policy is not states[1].policy
    # a step's metrics are its policy's own episodes (parameters mode: from step 1 the first of the 3
    # episodes is the teacher's; of the policy's 2, the second is acted by the copy refitted after the
    # first): re-collecting the first with the same seed gives it back
    again = rollout(states[1].policy, [tasks[1]], 1, seed=2, progress=False)
    assert float(states[1].experience.returns[1]) == pytest.approx(float(again.returns[0]), rel=1e-5)
    assert states[1].metrics["mean_return"] == pytest.approx(float(states[1].experience.returns[1:].mean()), rel=1e-5)
    torch.manual_seed(0)
    final, rows = improve(improver, start, tasks, steps=2, episodes=3, seed=1)
    assert [r["mean_return"] for r in rows] == pytest.approx([s.metrics["mean_return"] for s in states], rel=1e-5)


def test_stop_on_success_ends_the_loop(improver, toy):
    expert_like = toy.expert
    seen = []
    states = list(
        improvement_loop(improver, expert_like, toy.tasks("test")[:2], steps=5, episodes=2, callbacks=[StopOnSuccess(1.0), seen.append])
    )
    assert len(states) == 1 and states[0].metrics["success"] == 1.0 and len(seen) == 1
    with pytest.raises(ValueError, match="threshold"):
        StopOnSuccess(0.0)


def test_checkpoint_and_logs(improver, toy, tmp_path):
    checkpoint, log = Checkpoint(tmp_path / "ckpt", every=2), JSONLinesLog(tmp_path / "log.jsonl")
    tensorboard = TensorBoardLog(tmp_path / "tb")
    _, rows = improve(improver, MLPPolicy(4, 2), toy.tasks("test")[:2], steps=2, episodes=2, callbacks=[checkpoint, log, tensorboard])
    assert [p.name for p in checkpoint.saved] == ["step-000", "step-002"]
    policy, record = load_policy(tmp_path / "ckpt" / "step-002")
    assert record["metrics"] == rows[2]
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == rows
    assert list((tmp_path / "tb").iterdir())
    # a class the package does not know is saved as weights plus metrics
    own = Checkpoint(tmp_path / "own")
    improve(improver, Mine(), toy.tasks("test")[:1], steps=1, episodes=1, callbacks=[own])
    from safetensors.torch import load_file

    Mine().load_state_dict(load_file(own.saved[1] / "model.safetensors"))
    with pytest.raises(ValueError, match="every"):
        Checkpoint(tmp_path, every=0)


def test_loop_rejects_bad_input(improver, toy):
    # raised when the loop is made, not at its first step
    with pytest.raises(TypeError, match="tasks must be"):
        improvement_loop(improver, MLPPolicy(4, 2), [1, 2])
    with pytest.raises(ValueError, match="memory"):
        improvement_loop(improver, MLPPolicy(4, 2), toy.tasks("test")[:1], memory=0)
    with pytest.raises(ValueError, match="steps"):
        improvement_loop(improver, MLPPolicy(4, 2), toy.tasks("test")[:1], steps=-1)
    with pytest.raises(ValueError, match="mode"):
        improvement_loop(improver, MLPPolicy(4, 2), toy.tasks("test")[:1], mode="params")
    with pytest.raises(ValueError, match="exploration"):
        improvement_loop(improver, MLPPolicy(4, 2), toy.tasks("test")[:1], exploration=-0.1)


def test_task_exploration_aims_each_episode_elsewhere(toy):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        locating = Improver(NetworkConfig(4, 2, width=32, task_dim=2), distill_steps=5)
    tasks = toy.tasks("test")[:1]
    with pytest.raises(ValueError, match="task_exploration needs mode='behaviour'"):
        improvement_loop(locating, MLPPolicy(4, 2), tasks, task_exploration=0.1)
    with pytest.raises(ValueError, match="task_exploration needs"):
        improvement_loop(improver_without_goal(), MLPPolicy(4, 2), tasks, mode="behaviour", task_exploration=0.1)
    start = MLPPolicy(4, 2)
    runs = [list(improvement_loop(locating, start, tasks, steps=1, episodes=3, seed=2, mode="behaviour", task_exploration=0.5)) for _ in range(2)]
    assert torch.equal(runs[0][1].experience.actions, runs[1][1].experience.actions)  # seeded
    behaviour = runs[0][1].policy
    sampling = TaskSampling(behaviour, 0.5, seed=1)
    first = runs[0][1].experience.tasks[0]
    aims = [locating.net.task_estimate(sampling.for_task(first._replace(episode_seed=s)).z) for s in range(3)]
    offsets = torch.stack(aims) - locating.net.task_estimate(behaviour.z)
    assert 0.1 < offsets.std() < 1.5 and not torch.allclose(offsets[0], offsets[1])  # noise in the goal's own units
    obs = runs[0][1].experience.observations[0, :5]
    assert not torch.allclose(sampling.for_task(first)(obs), behaviour(obs))  # the head acts on the moved goal
    assert torch.equal(sampling(obs), behaviour(obs))


def test_wide_task_exploration_follows_a_step_where_every_episode_failed(toy):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        locating = Improver(NetworkConfig(4, 2, width=32, task_dim=2), distill_steps=5)
    tasks, start = toy.tasks("test")[:1], MLPPolicy(4, 2)
    with pytest.raises(ValueError, match="wide_task_exploration must be"):
        improvement_loop(locating, start, tasks, mode="behaviour", wide_task_exploration=-1.0)
    with pytest.raises(ValueError, match="task_exploration needs"):
        improvement_loop(locating, start, tasks, wide_task_exploration=0.5)

    def step_one(**goal):
        return list(improvement_loop(locating, start, tasks, steps=1, episodes=3, seed=2, mode="behaviour", **goal))

    adaptive, wide, narrow = step_one(task_exploration=0.1, wide_task_exploration=0.5), step_one(task_exploration=0.5), step_one(task_exploration=0.1)
    assert not adaptive[0].experience.success.any()  # the untrained start fails, so step 1 aims with the wide noise
    assert torch.equal(adaptive[1].experience.actions, wide[1].experience.actions)
    assert not torch.equal(adaptive[1].experience.actions, narrow[1].experience.actions)


def improver_without_goal() -> Improver:
    return Improver(NetworkConfig(4, 2, width=16), distill_steps=1)


def test_exploration_noise_is_seeded_and_watched(improver, toy):
    tasks, policy = toy.tasks("test")[:2], MLPPolicy(4, 2).double()  # noise must reach a float64 policy too
    runs = [list(improvement_loop(improver, policy, tasks, steps=1, episodes=2, seed=3, exploration=0.3)) for _ in range(2)]
    plain = list(improvement_loop(improver, policy, tasks, steps=0, episodes=2, seed=3))[0].experience
    noisy = runs[0][0].experience
    assert torch.equal(noisy.actions, runs[1][0].experience.actions)
    with torch.no_grad():
        taken = noisy.actions[noisy.mask]
        deterministic = policy(noisy.observations[noisy.mask].double()).float()
    assert 0.15 < (taken - deterministic).std() < 0.35  # the collected actions carry the noise
    assert torch.equal(plain.actions[plain.mask], policy(plain.observations[plain.mask].double()).float().detach())
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].policy.parameters(), runs[1][1].policy.parameters()))


def test_an_improver_that_watches_frames_gets_them_in_the_loop(toy):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        watcher = Improver(NetworkConfig(4, 2, width=16, use_frames=True), distill_steps=2)
    states = list(improvement_loop(watcher, MLPPolicy(4, 2), toy.tasks("test")[0], steps=1, episodes=1))
    assert all(s.experience.frames is not None for s in states)
    assert states[0].experience.frames.shape[-2:] == (RenderConfig().size, RenderConfig().size)


class GoalEnv(gym.Env):
    """A plain Gymnasium env (no goal or success in its infos): push a point to x = 0.5."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = self.np_random.uniform(-0.1, 0.1, 4).astype(np.float32)
        return self.x.copy(), {}

    def step(self, action):
        self.x[:2] += 0.1 * np.asarray(action, np.float32)
        distance = abs(float(self.x[0]) - 0.5)
        return self.x.copy(), -distance, False, False, {"is_success": distance < 0.05}


def make_goal_env(render_mode=None):
    return gym.wrappers.TimeLimit(GoalEnv(), 20)


def test_a_gymnasium_env_factory_runs_in_the_loop(improver):
    task = env_task(make_goal_env)
    assert task.max_steps == 20
    towards = lambda obs: torch.tensor([[1.0, 0.0]]).expand(obs.shape[0], 2)  # noqa: E731
    assert rollout(towards, task, 2, progress=False).success.all()
    assert not rollout(lambda obs: -towards(obs), task, 2, progress=False).success.any()
    _, rows = improve(improver, Mine(), make_goal_env, steps=1, episodes=2)
    assert rows[1]["env_steps"] == 80
    with pytest.raises(ValueError, match="max_steps"):
        env_task(GoalEnv)
    with pytest.raises(ValueError, match="flat Box"):
        ContractWrapper(gym.make("CartPole-v1"))
    custom = env_task(GoalEnv, max_steps=5, success=lambda obs, reward, info: reward > -1.0)
    assert rollout(towards, custom, 1, progress=False).success.all()


sb3 = pytest.importorskip("stable_baselines3")


def test_sb3_callback_improves_every_m_rollouts_and_writes_back(improver, toy):
    from improver.integrations.sb3 import ImproverCallback, SB3Actor, TaskEnv

    task = toy.tasks("test")[0]
    model = sb3.PPO("MlpPolicy", TaskEnv(task), n_steps=40, batch_size=40, n_epochs=1, seed=0, device="cpu")
    snapshots = []

    class Spy(ImproverCallback):
        def improve_now(self):
            before = {k: v.clone() for k, v in self.model.policy.state_dict().items()}
            row = super().improve_now()
            after = self.model.policy.state_dict()
            snapshots.append(any(not torch.equal(before[k], after[k]) for k in before))
            return row

    callback = Spy(improver, task, every=2, episodes=2)
    model.learn(200, callback=callback)  # 5 rollouts: improvement before rollouts 3 and 5
    assert callback.rollouts == 5 and len(callback.history) == 2 and all(snapshots)
    assert callback.env_steps == 2 * 2 * task.max_steps
    assert model.predict(np.zeros(4, np.float32), deterministic=True)[0].shape == (2,)
    with pytest.raises(ValueError, match="every"):
        ImproverCallback(improver, task, every=0)
    assert SB3Actor(model.policy)(torch.zeros(3, 4)).shape == (3, 2)


def test_sb3_callback_can_watch_the_models_own_rollouts(improver, toy):
    from improver.integrations.sb3 import ImproverCallback, TaskEnv

    task = toy.tasks("test")[0]
    n_steps = 2 * task.max_steps
    model = sb3.PPO("MlpPolicy", TaskEnv(task), n_steps=n_steps, batch_size=n_steps, n_epochs=1, seed=0, device="cpu")
    buffers, watched = [], []

    class Spy(ImproverCallback):
        def _on_rollout_end(self):
            buffer = self.model.rollout_buffer
            buffers.append((buffer.observations[:, 0].copy(), np.clip(buffer.actions[:, 0], -1, 1), buffer.rewards[:, 0].copy()))

        def improve_now(self):
            watched.append(self.watched.trajectory(clear=False))
            return super().improve_now()

    with pytest.raises(ValueError, match="nothing to watch"):
        ImproverCallback(improver, None).improve_now()
    callback = Spy(improver, None, every=1, episodes=2)
    model.learn(3 * n_steps, callback=callback)  # 3 rollouts of 2 episodes: steps before rollouts 2 and 3
    assert len(callback.history) == 2 and callback.env_steps == 0
    for (observations, actions, rewards), seen in zip(buffers, watched):
        assert seen.observations.shape[:2] == (2, task.max_steps)
        np.testing.assert_array_equal(seen.observations.flatten(0, 1).numpy(), observations)
        np.testing.assert_array_equal(seen.actions.flatten(0, 1).numpy(), actions)
        # PPO adds the bootstrapped value to the reward of a truncated episode's last step
        np.testing.assert_allclose(seen.rewards[:, :-1].numpy(), rewards.reshape(2, -1)[:, :-1], rtol=1e-6)
    assert callback.history[0]["mean_return"] == pytest.approx(float(watched[0].returns.mean()))


def test_improver_callback_explores_while_collecting(improver, toy):
    from improver.integrations.sb3 import ImproverCallback, TaskEnv

    task = toy.tasks("test")[0]
    returns = []
    for exploration in (0.0, 0.5):
        model = sb3.PPO("MlpPolicy", TaskEnv(task), n_steps=40, batch_size=40, n_epochs=1, seed=0, device="cpu")
        callback = ImproverCallback(improver, task, every=1, episodes=2, exploration=exploration)
        model.learn(80, callback=callback)
        returns.append(callback.history[0]["mean_return"])
    # Same model, same seeds: only the action noise makes the watched episodes differ.
    assert returns[0] != pytest.approx(returns[1])


def test_improver_callback_keeps_at_most_max_visited_of_the_latest_states(improver, toy, monkeypatch):
    from improver.integrations.sb3 import ImproverCallback, TaskEnv

    task = toy.tasks("test")[0]
    model = sb3.PPO("MlpPolicy", TaskEnv(task), n_steps=40, batch_size=40, n_epochs=1, seed=0, device="cpu")
    callback = ImproverCallback(improver, task, every=1, episodes=1, max_visited=50)
    fitted = []
    original = callback.improver.fit_to
    monkeypatch.setattr(improver, "fit_to", lambda policy, behaviour, states: (fitted.append(len(states)), original(policy, behaviour, states))[1])
    model.learn(160, callback=callback)
    # 3 steps of one 40-step episode, each fitted on it and on the earlier steps' latest states (none,
    # then 40, then 50 of 80); from step 2 the copy is also refitted after its episode (one round)
    assert fitted == [40, 80, 80, 90, 90]
    assert callback.visited.shape == (50, 4)
    with pytest.raises(ValueError, match="max_visited"):
        ImproverCallback(improver, task, max_visited=-1)


def test_improver_callback_collects_as_parameters_mode_does(improver, toy, monkeypatch):
    from improver.integrations import sb3 as integration

    task = toy.tasks("test")[0]
    model = sb3.PPO("MlpPolicy", integration.TaskEnv(task), n_steps=40, batch_size=40, n_epochs=1, seed=0, device="cpu")
    teachers = []
    original = integration.collect_step
    monkeypatch.setattr(integration, "collect_step", lambda imp, actor, teacher, *rest: (teachers.append(teacher), original(imp, actor, teacher, *rest))[1])
    callback = integration.ImproverCallback(improver, task, every=1, episodes=4)
    model.learn(120, callback=callback)  # 3 rollouts: steps before rollouts 2 and 3
    # the first step has no teacher; the second is led by the behaviour the first fitted the actor to
    assert teachers[0] is None and teachers[1] is not None
    assert callback.env_steps == 2 * 4 * task.max_steps
    assert callback.teacher is not None and callback.teacher is not teachers[1]


def test_improve_sb3_on_tasks_returns_a_model_that_saves_and_loads(improver, toy, tmp_path):
    from improver.integrations.sb3 import SB3Actor, improve_sb3_on_tasks, ppo_from_policy

    model = ppo_from_policy(MLPPolicy(4, 2), toy.tasks("test")[0], n_steps=64, seed=0)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    same, rows = improve_sb3_on_tasks(improver, model, toy.tasks("test")[:2], steps=2, episodes=2)
    assert same is model and [r["step"] for r in rows] == [0, 1, 2]
    assert any(not torch.equal(before[k], v) for k, v in model.policy.state_dict().items())
    # the model now acts like the improved actor whose own episode was measured at step 2 (the other is the teacher's)
    again = rollout(SB3Actor(model.policy), [toy.tasks("test")[1]], 1, seed=2, progress=False)
    assert rows[2]["mean_return"] == pytest.approx(float(again.returns.mean()), rel=1e-5)
    model.save(tmp_path / "model.zip")
    loaded = sb3.PPO.load(tmp_path / "model.zip", device="cpu")
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0], rtol=1e-6)


def test_improve_sb3_on_tasks_in_behaviour_mode_distils_by_dagger(improver, toy):
    from improver.integrations.sb3 import SB3Actor, improve_sb3_on_tasks, ppo_from_policy

    tasks, start = toy.tasks("test")[:2], MLPPolicy(4, 2)
    model, untouched = (ppo_from_policy(start, tasks[0], n_steps=64, seed=0) for _ in range(2))
    with pytest.raises(ValueError, match="mode must be"):
        improve_sb3_on_tasks(improver, model, tasks, mode="both")
    with pytest.raises(ValueError, match="steps >= 1"):
        improve_sb3_on_tasks(improver, model, tasks, steps=0, mode="behaviour")
    _, rows = improve_sb3_on_tasks(improver, model, tasks, steps=2, episodes=2, mode="behaviour", dagger_rounds=2, exploration=0.3)
    assert [r.get("step", r.get("round")) for r in rows] == [0, 1, 2, 1, 2]
    assert [r["env_steps"] for r in rows] == [80, 160, 240, 320, 400]  # the DAgger rounds' episodes are counted
    # the written-back actor imitates the loop's final behaviour policy on the states it visits itself
    teacher = list(improvement_loop(improver, SB3Actor(untouched.policy), tasks, 2, 2, mode="behaviour", exploration=0.3))[-1].policy
    own = rollout(SB3Actor(model.policy), tasks, 1, seed=7, progress=False)
    states = own.observations[own.mask]
    with torch.no_grad():
        error = (SB3Actor(model.policy)(states) - teacher(states)).pow(2).mean()
        before = (SB3Actor(untouched.policy)(states) - teacher(states)).pow(2).mean()
    assert error < 0.2 * before


def test_the_loop_runs_with_the_improvers_settings_unless_told_otherwise(toy):
    from improver.loop_settings import LoopSettings
    from improver.operator import BehaviourPolicy

    with torch.random.fork_rng():
        torch.manual_seed(0)
        settings = LoopSettings("behaviour", exploration=0.3, task_exploration=0.5, memory=2)
        carrying = Improver(NetworkConfig(4, 2, width=32, task_dim=2), distill_steps=5, loop_settings=settings)
    bare = Improver(NetworkConfig(4, 2, width=32, task_dim=2), distill_steps=5)
    bare.load_state_dict(carrying.state_dict())
    tasks, start = toy.tasks("test")[:1], MLPPolicy(4, 2)

    def key(rows):
        return [(r["success"], r["mean_return"], r["env_steps"]) for r in rows]

    final, rows = improve(carrying, start, tasks, steps=2, episodes=2, seed=1)
    assert isinstance(final, BehaviourPolicy)
    assert key(rows) == key(improve(bare, start, tasks, 2, 2, 1, mode="behaviour", exploration=0.3, task_exploration=0.5, memory=2)[1])
    assert key(rows) != key(improve(bare, start, tasks, 2, 2, 1, mode="behaviour")[1])
    # explicit arguments win; parameters mode drops the carried goal exploration, which is behaviour mode's
    assert key(improve(carrying, start, tasks, 2, 2, 1, exploration=0.0, task_exploration=0.0, memory=1)[1]) == key(
        improve(bare, start, tasks, 2, 2, 1, mode="behaviour")[1]
    )
    distilled, _ = improve(carrying, start, tasks, steps=1, episodes=2, mode="parameters")
    assert isinstance(distilled, MLPPolicy)
    with pytest.raises(ValueError, match="task_exploration needs mode='behaviour'"):
        improvement_loop(carrying, start, tasks, mode="parameters", task_exploration=0.1)


def test_the_sb3_callback_collects_with_the_improvers_exploration_unless_told_otherwise(toy):
    pytest.importorskip("stable_baselines3")
    from improver.integrations.sb3 import ImproverCallback
    from improver.loop_settings import LoopSettings

    carrying = Improver(NetworkConfig(4, 2, width=16), distill_steps=1, loop_settings=LoopSettings(exploration=0.3))
    task = toy.tasks("test")[0]
    assert ImproverCallback(carrying, task).exploration == 0.3
    assert ImproverCallback(carrying, task, exploration=0.0).exploration == 0.0
    with pytest.raises(ValueError, match="exploration must be a non-negative noise level"):
        ImproverCallback(carrying, task, exploration=-1.0)
