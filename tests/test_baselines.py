"""Baselines of `improver bench improve`: PPO from a given policy (SB3), filtered BC / RWR, MAML (higher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from improver.tasks import rollout

from improver.policies import MLPPolicy

pytest.importorskip("stable_baselines3")


def _policy(seed: int = 0, obs_dim: int = 4, act_dim: int = 2) -> MLPPolicy:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLPPolicy(obs_dim, act_dim, hidden=(16, 16)).eval()


def test_task_env_follows_the_task_and_ends_episodes(toy):
    from stable_baselines3.common.env_checker import check_env

    from improver.integrations.sb3 import TaskEnv

    task = toy.tasks("test")[0]
    env = TaskEnv(task)
    check_env(env, warn=False)
    env.reset(seed=0)
    steps, truncated = 0, False
    while not truncated:
        obs, _, _, truncated, info = env.step(np.zeros(2, dtype=np.float32))
        steps += 1
    assert steps == task.max_steps and obs.dtype == np.float32 and "is_success" in info


def test_ppo_starts_exactly_as_the_policy_and_learns(toy, tmp_path):
    from stable_baselines3 import PPO

    from improver.integrations.sb3 import SB3Actor, ppo_from_policy

    task = toy.tasks("test")[0]
    policy = _policy()
    model = ppo_from_policy(policy, task, n_steps=40, batch_size=20, n_epochs=2, seed=0)
    obs = torch.randn(64, 4)
    with torch.no_grad():
        assert torch.allclose(SB3Actor(model.policy)(obs), policy(obs), atol=1e-6)
        predicted, _ = model.predict(obs.numpy(), deterministic=True)
        assert np.allclose(predicted, policy(obs).numpy(), atol=1e-6)
    # Same deterministic episodes as the policy it started from (same seeds).
    before = rollout(policy, task, 2, seed=3, progress=False)
    as_ppo = rollout(SB3Actor(model.policy), task, 2, seed=3, progress=False)
    assert torch.allclose(before.returns, as_ppo.returns)

    model.learn(total_timesteps=80)
    assert model.num_timesteps == 80
    with torch.no_grad():
        assert not torch.allclose(SB3Actor(model.policy)(obs), policy(obs))
    model.save(tmp_path / "ppo.zip")
    loaded = PPO.load(tmp_path / "ppo.zip", device="cpu")
    with torch.no_grad():
        assert torch.allclose(SB3Actor(loaded.policy)(obs), SB3Actor(model.policy)(obs))


def test_ppo_from_policy_refuses_mismatched_dims_and_other_policies(toy):
    from improver.integrations.sb3 import ppo_from_policy

    task = toy.tasks("test")[0]
    with pytest.raises(ValueError, match="observation shape"):
        ppo_from_policy(_policy(obs_dim=39, act_dim=4), task)
    with pytest.raises(TypeError, match="MLPPolicy"):
        ppo_from_policy(torch.nn.Linear(4, 2), task)
    with pytest.raises(ValueError, match="activation_fn"):
        ppo_from_policy(_policy(), task, policy_kwargs={"activation_fn": torch.nn.ReLU})


# --- filtered BC / RWR ---------------------------------------------------------------------------


def test_episode_weights():
    from improver.baselines.bc import episode_weights

    returns = torch.tensor([1.0, 5.0, 3.0, -2.0])
    filtered = episode_weights(returns, "filter", top=0.5)
    assert torch.equal(filtered, torch.tensor([0.0, 0.5, 0.5, 0.0]))
    rwr = episode_weights(returns, "rwr", temperature=0.5)
    assert torch.isclose(rwr.sum(), torch.tensor(1.0)) and torch.equal(rwr.argsort(), returns.argsort())
    colder = episode_weights(returns, "rwr", temperature=0.1)
    assert colder[1] > rwr[1]  # a lower temperature puts more weight on the best episode
    with pytest.raises(ValueError, match="top"):
        episode_weights(returns, "filter", top=0.0)
    with pytest.raises(ValueError, match="weighting"):
        episode_weights(returns, "nope")


def test_exploring_is_seeded_bounded_and_noisy():
    from improver.baselines.bc import Exploring

    policy, obs = _policy(), torch.randn(8, 4)
    a, b = Exploring(policy, 0.3, seed=1)(obs), Exploring(policy, 0.3, seed=1)(obs)
    assert torch.equal(a, b) and a.abs().max() <= 1.0
    assert not torch.allclose(a, policy(obs))
    with pytest.raises(ValueError, match="noise must be positive"):
        Exploring(policy, 0.0, seed=1)


def test_filtered_bc_clones_only_the_best_episodes(toy):
    from dataclasses import replace

    from improver.baselines.bc import collect_exploring, filtered_bc

    policy = _policy()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    experience = collect_exploring(policy, toy.tasks("test")[:1] * 6, noise=0.5, seed=0)
    best = int(experience.returns.argmax())
    # Give the best episode one action and all others the opposite one: filtered BC must pick the former.
    good = torch.tensor([0.5, -0.5])
    actions = (-good).expand_as(experience.actions).clone()
    actions[best] = good
    experience = replace(experience, actions=actions)
    improved = filtered_bc(policy, experience, top=1 / 6, epochs=200, lr=1e-2)
    with torch.no_grad():
        assert (improved(experience.observations[best]) - good).abs().max() < 0.1
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_bc_steps_count_env_steps(toy):
    from improver.baselines.bc import bc_steps

    checkpoints = list(bc_steps(_policy(), toy.tasks("test")[:2] * 2, steps=2, epochs=5))
    assert [c.env_steps for c in checkpoints] == [0, 4 * 40, 8 * 40]
    assert checkpoints[0].policy is not checkpoints[2].policy


# --- MAML (Meta-SGD with higher) -----------------------------------------------------------------


def test_maml_adapt_is_a_copy_and_agrees_with_the_functional_path(toy, tmp_path):
    import higher

    from improver.baselines.bc import collect_exploring
    from improver.baselines.maml import MetaSGD

    policy = _policy()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    experience = collect_exploring(policy, toy.tasks("test")[:1] * 4, noise=0.3, seed=0)
    update = MetaSGD(policy, inner_steps=3, lr=0.05)
    adapted = update.adapt(policy, experience)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(adapted.parameters(), policy.parameters()))
    fmodel = higher.monkeypatch(policy, copy_initial_weights=True)
    params = update.adapted_parameters(fmodel, list(fmodel.parameters()), experience)
    for a, p in zip(adapted.parameters(), params):
        assert torch.allclose(a, p, atol=1e-6)
    # The step sizes get gradients through the inner loop (this is what meta-training uses).
    sum(p.sum() for p in params).backward()
    assert all(lr.grad is not None and lr.grad.abs().sum() > 0 for lr in update.log_lrs)

    update.save_pretrained(tmp_path / "update")
    loaded = MetaSGD.from_pretrained(tmp_path / "update")
    for a, b in zip(loaded.adapt(policy, experience).parameters(), adapted.parameters()):
        assert torch.allclose(a, b)
    with pytest.raises(ValueError, match="parameter shapes"):
        update.adapt(MLPPolicy(4, 2, hidden=(8,)), experience)
    with pytest.raises(FileNotFoundError, match="MAML update"):
        MetaSGD.from_pretrained(tmp_path / "missing")


def test_meta_train_maml_learns_the_step_sizes(toy_dataset):
    from improver.augment.dataset import ImprovementDataset

    from improver.baselines.maml import meta_train_maml

    update, report = meta_train_maml(ImprovementDataset(toy_dataset), examples=2, episodes=2, iterations=3, batch_size=2, inner_steps=2, progress=False)
    assert report["second_order"] and report["examples"] == 2 and report["env_steps"] == 2 * 2 * 40
    initial = torch.tensor(update.config["lr"]).log()
    assert any(not torch.allclose(lr, initial.expand_as(lr)) for lr in update.log_lrs)


# --- PPO -----------------------------------------------------------------------------------------


def test_ppo_steps_checkpoints(toy):
    from improver.baselines.ppo import ppo_steps

    task = toy.tasks("test")[:1]
    checkpoints = [c.env_steps for c in ppo_steps(_policy(), task, budget=40, checkpoints=[0, 1, 3], n_epochs=1)]
    assert checkpoints == [0, 40, 120]
    with pytest.raises(ValueError, match="increasing"):
        list(ppo_steps(_policy(), task, budget=40, checkpoints=[2, 1]))


def test_task_env_fits_sb3_on_meta_world(push):
    # SB3's check_env refuses Meta-World envs as "goal envs" (they define compute_reward); PPO does not care.
    from improver.integrations.sb3 import SB3Actor, TaskEnv, ppo_from_policy

    env = TaskEnv(push.tasks("test")[0])
    assert env.observation_space.dtype == np.float32  # Meta-World declares float64
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert env.observation_space.contains(env.step(env.action_space.sample())[0])
    policy = _policy(obs_dim=39, act_dim=4)
    model = ppo_from_policy(policy, env, n_steps=64, batch_size=64)
    obs = torch.as_tensor(env.reset(seed=0)[0])[None]
    with torch.no_grad():
        assert torch.allclose(SB3Actor(model.policy)(obs), policy(obs), atol=1e-6)
