"""Meta-World's own evaluation harness: ImproverAgent, NoAdaptationAgent, evaluate_in_metaworld, `improver metaworld-eval`."""

import json
from collections import namedtuple
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from improver.integrations.metaworld import ImproverAgent, NoAdaptationAgent, make_evaluation_envs
from improver.loop_settings import LoopSettings
from improver.network import NetworkConfig
from improver.operator import BehaviourPolicy, Improver
from improver.policies import MLPPolicy, load_policy
from improver.tasks.toy import SUCCESS_RADIUS

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained" / "reach-v3"
# metaworld.evaluation.Timestep's fields; the toy tests spare themselves importing MuJoCo
Timestep = namedtuple("Timestep", "observation action reward terminated truncated aux_policy_outputs")
HORIZON = 8  # toy episodes' length here


@pytest.fixture(scope="module")
def toy_improver():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Improver(NetworkConfig(4, 2, width=32, task_dim=2), distill_steps=3, loop_settings=LoopSettings("behaviour", exploration=0.3))


def adapt(agent, task, steps=1, episodes=2, envs=2):
    """What `metalearning_evaluation` does for one goal before evaluating, on toy envs; returns the
    observations and actions of every step."""
    make = [lambda: gym.wrappers.TimeLimit(task.make_env(None), HORIZON)] * envs
    vector = gym.vector.SyncVectorEnv(make, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    seen = []
    agent.init()
    for _ in range(steps):
        obs, _ = vector.reset(seed=0)
        elapsed = np.zeros(envs)
        while not (elapsed >= episodes).all():
            actions, aux = agent.adapt_action(obs)
            next_obs, rewards, terminated, truncated, _ = vector.step(actions)
            agent.step(Timestep(obs, actions, rewards, terminated, truncated, aux))
            seen.append((obs, actions))
            elapsed += terminated | truncated
            obs = next_obs
        agent.adapt()
    vector.close()
    return seen


def test_the_agent_steps_on_the_harness_episodes_and_evaluates_without_noise(toy_improver, toy):
    task, start = toy.tasks("test")[0], MLPPolicy(4, 2)
    agent = ImproverAgent(toy_improver, start, success_reward=-10.0)  # every toy step counts as a success
    seen = adapt(agent, task, steps=2)
    assert agent.tasks == 1 and agent.adapted == 2 and isinstance(agent.policy, BehaviourPolicy)
    experience = agent.history[-1]
    assert experience.observations.shape == (4, HORIZON, 4) and experience.mask.all() and experience.success.all()
    # the episodes of the first step are the ones the agent acted on, with exploration noise
    obs, actions = np.stack([o for o, _ in seen[:HORIZON]]), np.stack([a for _, a in seen[:HORIZON]])
    plain = start(torch.as_tensor(obs, dtype=torch.float32).flatten(0, 1)).detach().numpy().reshape(actions.shape)
    assert not np.allclose(actions, plain) and np.abs(actions).max() <= 1.0
    probe = np.random.default_rng(0).normal(size=(3, 4))
    evaluated = agent.eval_action(probe)
    assert evaluated.dtype == np.float64 and np.allclose(evaluated, agent.policy(torch.as_tensor(probe, dtype=torch.float32)).detach().numpy())
    agent.init()  # the next goal starts again from the starting policy
    assert agent.policy is start and agent.adapted == 0 and agent.history == []


def test_success_is_read_from_the_reward(toy_improver, toy):
    task = toy.tasks("test")[0]
    for success_reward, expected in ((-10.0, True), (-SUCCESS_RADIUS, False)):
        agent = ImproverAgent(toy_improver, MLPPolicy(4, 2), success_reward=success_reward)
        adapt(agent, task)  # a fresh MLP does not come within reach of the goal in HORIZON steps
        assert bool(agent.history[0].successes.any()) is expected


def test_adaptation_noise_is_reproducible_by_seed(toy_improver, toy):
    task, start = toy.tasks("test")[0], MLPPolicy(4, 2)

    def actions(seed):
        return np.stack([a for _, a in adapt(ImproverAgent(toy_improver, start, seed=seed), task, steps=2)])

    first = actions(0)
    assert np.array_equal(first, actions(0)) and not np.array_equal(first, actions(1))


def test_parameters_mode_lets_the_teacher_act_and_refits_the_copy_within_a_step(toy_improver, toy, monkeypatch):
    fits = []
    fit_to = Improver.fit_to
    monkeypatch.setattr(Improver, "fit_to", lambda self, p, b, states: fits.append((b, len(states))) or fit_to(self, p, b, states))
    agent = ImproverAgent(toy_improver, MLPPolicy(4, 2), mode="parameters", exploration=0.0)
    seen = adapt(agent, toy.tasks("test")[0], steps=2)  # 2 sub-envs x 2 episodes a step
    # step 1's adapt fits the copy (32 states); in step 2 the teacher acts the first 2 episodes, the copy
    # the other 2 and is refitted after each on all 64 states so far; then step 2's adapt
    assert [n for _, n in fits] == [32, 64, 64, 64]
    teacher = fits[0][0]
    assert fits[1][0] is teacher and fits[3][0] is agent.teacher is not teacher
    obs, actions = seen[2 * HORIZON]  # step 2's first actions: its first 2 episodes, the teacher's
    assert np.allclose(actions, teacher(torch.as_tensor(obs, dtype=torch.float32)).detach().numpy(), atol=1e-5)


def test_parameters_mode_memory_and_task_exploration_follow_the_settings(toy_improver, toy):
    task, start = toy.tasks("test")[0], MLPPolicy(4, 2)
    agent = ImproverAgent(toy_improver, start, mode="parameters", memory=2, exploration=0.0)
    seen = adapt(agent, task, steps=2)
    assert isinstance(agent.policy, MLPPolicy) and agent.policy is not start
    assert [h.num_episodes for h in agent.history] == [4, 4]
    # every step's states are kept for the refit (DAgger); the watched ones (memory 2) go in the experience
    assert [len(v) for v in agent.visited] == [int(h.mask.sum()) for h in agent.history]
    first_obs, first_actions = seen[0]  # no exploration: the starting policy's own actions
    assert np.allclose(first_actions, start(torch.as_tensor(first_obs, dtype=torch.float32)).detach().numpy())
    # behaviour mode, task exploration only: from the second step on, each episode acts on its own moved task
    row = np.random.default_rng(0).normal(size=(1, 4))
    for sigma in (0.0, 0.5):
        agent = ImproverAgent(toy_improver, start, exploration=0.0, task_exploration=sigma)
        adapt(agent, task, steps=1)
        actions, _ = agent.adapt_action(np.concatenate([row, row]))  # two sub-envs' first steps of step 2
        unmoved = agent.policy(torch.as_tensor(row, dtype=torch.float32)).detach().numpy()
        assert np.allclose(actions, unmoved, atol=1e-6) is (sigma == 0.0)
        assert np.allclose(actions[0], actions[1]) is (sigma == 0.0)


def test_the_agent_refuses_bad_settings(toy_improver):
    with pytest.raises(ValueError, match="task_exploration needs mode='behaviour'"):
        ImproverAgent(toy_improver, MLPPolicy(4, 2), mode="parameters", task_exploration=0.1)
    bare = Improver(NetworkConfig(4, 2, width=32), distill_steps=1)
    with pytest.raises(ValueError, match="infers the task"):
        ImproverAgent(bare, MLPPolicy(4, 2), mode="behaviour", task_exploration=0.1)
    with pytest.raises(ValueError, match="success_reward"):
        ImproverAgent(toy_improver, MLPPolicy(4, 2), success_reward=float("nan"))
    with pytest.raises(ValueError, match="no episode has ended"):
        ImproverAgent(toy_improver, MLPPolicy(4, 2)).adapt()


def test_the_baseline_acts_with_its_policy_unchanged():
    policy = MLPPolicy(4, 2)
    agent = NoAdaptationAgent(policy)
    obs = np.random.default_rng(0).normal(size=(2, 4))
    agent.init()
    actions, aux = agent.adapt_action(obs)
    agent.step(Timestep(obs, actions, np.zeros(2), np.ones(2, bool), np.zeros(2, bool), aux))
    agent.adapt()
    assert aux == {} and np.array_equal(actions, agent.eval_action(obs)) and agent.policy is policy
    assert np.allclose(actions, policy(torch.as_tensor(obs, dtype=torch.float32)).detach().numpy())


# --- Meta-World itself -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    improver = Improver.from_pretrained(PRETRAINED / "improver")
    policy, _ = load_policy(PRETRAINED / "lesser" / "00")
    return improver, policy


def test_the_agent_runs_through_metaworlds_own_evaluation(shipped):
    envs = make_evaluation_envs("reach-v3", tasks=1, seed=0, max_episode_steps=30)
    from metaworld.evaluation import metalearning_evaluation  # after make_evaluation_envs chose the GL backend

    agent = ImproverAgent(*shipped)
    try:
        success, mean_return, per_task = metalearning_evaluation(agent, envs, num_evals=1, adaptation_steps=1, adaptation_episodes=1, evaluation_episodes=1)
    finally:
        envs.close()
    assert agent.tasks == 1 and agent.adapted == 1 and isinstance(agent.policy, BehaviourPolicy)  # the shipped improver's mode
    assert agent.history[0].observations.shape == (1, 30, 39) and agent.history[0].mask.all()
    assert list(per_task) == ["reach-v3"] and np.isfinite(mean_return)
    assert success in (0.0, 1.0) and success == per_task["reach-v3"]  # one goal, one evaluation episode: the task's own rate


def test_the_command_prints_metaworlds_figures_for_both_agents(tmp_path, capsys):
    from improver.cli import main

    out = tmp_path / "figures.json"
    main([
        "metaworld-eval", "--improver", str(PRETRAINED / "improver"), "--family", "reach-v3", "--policy", str(PRETRAINED / "lesser" / "00"),
        "--tasks", "1", "--adaptation-steps", "1", "--adaptation-episodes", "1", "--evaluation-episodes", "1", "--max-episode-steps", "30",
        "--mode", "parameters", "--out", str(out),
    ])
    printed = capsys.readouterr().out
    assert "| improver" in printed and "| no adaptation" in printed and "'mode': 'parameters'" in printed
    result = json.loads(out.read_text())
    assert [row["agent"] for row in result["rows"]] == ["improver", "no adaptation"]
    assert result["settings"]["mode"] == "parameters" and result["tasks"] == 1
    assert all(row["success"] in (0.0, 1.0) and np.isfinite(row["mean_return"]) for row in result["rows"])  # one goal, one episode


def test_evaluation_envs_refuse_bad_requests():
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        make_evaluation_envs("reach-v9", tasks=1)
    with pytest.raises(ValueError, match="tasks must be at least 1"):
        make_evaluation_envs("reach-v3", tasks=0)
    with pytest.raises(ValueError, match="test tasks"):
        make_evaluation_envs("reach-v3", tasks=51)
