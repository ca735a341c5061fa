import copy
import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from improver.network import NetworkConfig
from improver.operator import BehaviourPolicy, Improver
from improver.policies import MLPPolicy
from improver.tasks import rollout


@pytest.fixture(scope="module")
def improver():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Improver(NetworkConfig(4, 2, width=32), distill_steps=5)


@pytest.fixture(scope="module")
def experience(toy):
    return rollout(MLPPolicy(4, 2), toy.tasks("test")[:3], 2, progress=False)


class TwoHeaded(nn.Module):
    """A policy architecture the package does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.ELU())
        self.left, self.right = nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, obs):
        h = self.trunk(obs)
        return torch.tanh(torch.cat([self.left(h), self.right(h)], dim=-1))


class Recurrent(nn.Module):
    """Returns (actions, hidden state), as recurrent policies do."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, obs):
        h, state = self.rnn(obs[:, None])
        return self.out(h[:, -1]), state


class PixelPolicy(nn.Module):
    """A CNN from [B, 3, 32, 32] frames to actions."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2), nn.Tanh())
        self.net(torch.zeros(1, 3, 32, 32))

    def forward(self, frames):
        return self.net(frames)


def test_pixel_cnn_policy(improver, toy):
    from improver.tasks import RenderConfig

    experience = rollout(MLPPolicy(4, 2), toy.tasks("test")[:2], 1, render=RenderConfig(every=4, size=32), progress=False)
    policy = PixelPolicy()
    before = copy.deepcopy(policy.state_dict())
    improved = improver.step(policy, experience, inputs="frames")
    assert type(improved) is PixelPolicy
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in improved.state_dict().items())
    assert improved(experience.frames[:, 0].float() / 255).shape == (2, 2)


@pytest.mark.parametrize("make", [lambda: MLPPolicy(4, 2), TwoHeaded, lambda: MLPPolicy(4, 2).double()])
def test_parameters_step_returns_a_changed_copy_and_leaves_the_input_alone(improver, experience, make):
    policy = make()
    before = copy.deepcopy(policy.state_dict())
    improved = improver.step(policy, experience)
    assert type(improved) is type(policy) and improved is not policy
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    after = improved.state_dict()
    assert after.keys() == before.keys() and all(after[k].shape == before[k].shape and after[k].dtype == before[k].dtype for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_distillation_moves_the_policy_toward_the_head(improver, experience):
    policy = MLPPolicy(4, 2)
    z = improver.context(policy, experience)
    states = experience.observations[experience.mask]
    with torch.no_grad():
        target = improver.net.head.act(improver.net.normalize(states), z)
        gap_before = (policy(states) - target).pow(2).mean()
        gap_after = (improver.step(policy, experience)(states) - target).pow(2).mean()
    assert gap_after < gap_before


def test_distillation_stays_stable_on_large_raw_observations(improver):
    """Steep losses (big raw inputs) must not make the distillation steps diverge."""
    torch.manual_seed(0)
    policy = nn.Linear(4, 2)  # no squashing: its loss is as steep as its inputs are large
    states = torch.randn(256, 4) * 100.0
    targets = torch.rand(256, 2) * 2 - 1
    with torch.no_grad():
        before = (policy(states) - targets).pow(2).mean()
    for differentiable in (False, True):
        distilled = improver.distill(copy.deepcopy(policy), states, targets, differentiable=differentiable, probe=states)
        actions = distilled if differentiable else distilled(states)
        after = (actions - targets).pow(2).mean()
        assert torch.isfinite(after) and after < before
        if differentiable:
            after.backward()
            assert improver.log_lrs.grad.norm() < 1e3


def test_fitted_parameters_mode_fits_the_head_and_survives_save_and_load(improver, experience, tmp_path):
    fitted = copy.deepcopy(improver)
    fitted.fit_epochs = 30
    fitted.save_pretrained(tmp_path / "fitted")
    reloaded = Improver.from_pretrained(tmp_path / "fitted")
    assert reloaded.fit_epochs == 30
    policy = MLPPolicy(4, 2)
    states = experience.observations[experience.mask]
    with torch.no_grad():
        target = improver.net.head.act(improver.net.normalize(states), improver.context(policy, experience))
        gaps = [(p(states) - target).pow(2).mean() for p in (policy, reloaded.step(policy, experience), reloaded.step(policy, experience))]
    assert gaps[1] < 0.1 * gaps[0], gaps
    assert gaps[1] == gaps[2]  # seeded: the same experience gives the same policy
    with pytest.raises(ValueError, match="fit_epochs"):
        Improver(NetworkConfig(4, 2), fit_epochs=-1)


def test_behaviour_step_acts_with_the_head(improver, experience):
    behaviour = improver.step(MLPPolicy(4, 2), experience, mode="behaviour")
    assert isinstance(behaviour, BehaviourPolicy)
    actions = behaviour(experience.observations[:, 0])
    assert actions.shape == (experience.num_episodes, 2) and actions.abs().max() <= 1


def test_bad_input(improver, experience):
    with pytest.raises(ValueError, match="4-d observations"):
        improver.step(MLPPolicy(5, 2), replace(experience, observations=torch.zeros(6, 40, 5)))
    with pytest.raises(ValueError, match=r"to \[B, 2\] actions; it returned \(3,\)"):
        improver.step(MLPPolicy(4, 3), experience)
    with pytest.raises(ValueError, match="recurrent policies are not supported"):
        improver.step(Recurrent(), experience)
    with pytest.raises(ValueError, match="needs frames"):
        improver.step(MLPPolicy(4, 2), experience, inputs="frames")
    with pytest.raises(ValueError, match="no rewards"):
        improver.step(MLPPolicy(4, 2), replace(experience, rewards=None))
    with pytest.raises(ValueError, match="mode must be"):
        improver.step(MLPPolicy(4, 2), experience, mode="magic")
    with pytest.raises(TypeError, match="Trajectory"):
        improver.step(MLPPolicy(4, 2), {"observations": experience.observations})


def test_reward_free_experience_uses_the_ranking_reward(improver, experience, toy, tmp_path):
    from improver.augment.drex import NoiseLadder, ranked_family
    from improver.augment.ranking_reward import RewardModelConfig, train_reward_model

    family = ranked_family(toy.expert, toy.tasks("train")[:2], NoiseLadder((1.0, 0.0)), 1, seed=0)
    with_rm = copy.deepcopy(improver)
    with_rm.reward_model = train_reward_model(family.trajectory, family.ranks, RewardModelConfig(steps=5, pairs=20, snippet=(5, 10)), progress=False)
    improved = with_rm.step(MLPPolicy(4, 2), replace(experience, rewards=None))
    assert isinstance(improved, MLPPolicy)
    with_rm.save_pretrained(tmp_path / "with_rm")
    reloaded = Improver.from_pretrained(tmp_path / "with_rm")
    policy = MLPPolicy(4, 2)
    a = reloaded.step(policy, replace(experience, rewards=None))
    b = with_rm.step(policy, replace(experience, rewards=None))
    assert all(torch.allclose(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_save_and_load(improver, experience, tmp_path):
    improver.save_pretrained(tmp_path / "imp", metadata={"note": "test"})
    loaded = Improver.from_pretrained(tmp_path / "imp")
    policy = MLPPolicy(4, 2)
    torch.testing.assert_close(loaded.context(policy, experience), improver.context(policy, experience))
    with pytest.raises(ValueError, match="do not fit"):
        other = Improver(NetworkConfig(4, 2, width=16), distill_steps=5)
        other.save_pretrained(tmp_path / "small")
        config = (tmp_path / "small" / "config.json").read_text().replace('"width": 16', '"width": 32')
        (tmp_path / "small" / "config.json").write_text(config)
        Improver.from_pretrained(tmp_path / "small")
    with pytest.raises(FileNotFoundError, match="not an improver checkpoint"):
        Improver.from_pretrained(tmp_path)


def test_step_time_for_ten_long_episodes_is_printed(toy):
    improver = Improver(NetworkConfig(39, 4))
    experience = rollout(MLPPolicy(39, 4), _long_tasks(), 1, progress=False)
    policy = MLPPolicy(39, 4)
    improver.step(policy, experience)  # warm-up
    start = time.perf_counter()
    improver.step(policy, experience)
    print(f"step time, MLP policy, 10 episodes x 500 steps: {time.perf_counter() - start:.3f} s")


def _long_tasks():
    from improver.tasks import make_suite

    return make_suite("ML1:push-v3").tasks("test")[:10]


def test_improvement_loop_and_command(improver, toy, tmp_path, capsys):
    from improver.cli import main
    from improver.loop import improve
    from improver.policies import save_policy

    final, rows = improve(improver, MLPPolicy(4, 2), toy.tasks("test")[:2], steps=2, episodes=4)
    assert [r["step"] for r in rows] == [0, 1, 2] and isinstance(final, MLPPolicy)
    assert [r["env_steps"] for r in rows] == [160, 320, 480]
    assert all(0.0 <= r["success"] <= 1.0 for r in rows)
    _, free_rows = improve(improver, MLPPolicy(4, 2), toy.tasks("test")[:2], steps=1, episodes=2, mode="behaviour")
    assert len(free_rows) == 2

    improver.save_pretrained(tmp_path / "imp")
    save_policy(MLPPolicy(4, 2), tmp_path / "policy")
    main(["improve", "--policy", str(tmp_path / "policy"), "--improver", str(tmp_path / "imp"), "--suite", "toy:reach2d",
          "--task-index", "0", "--steps", "1", "--episodes", "2", "--out", str(tmp_path / "better")])
    assert "| step" in capsys.readouterr().out
    from improver.policies import load_policy

    _, record = load_policy(tmp_path / "better")
    assert record["improved_steps"] == 1 and len(record["rows"]) == 2


def test_stable_baselines3_policy(improver, experience, toy):
    from stable_baselines3 import PPO

    from improver.integrations.sb3 import SB3Actor, improve_sb3

    model = PPO("MlpPolicy", toy.tasks("train")[0].make_env(), n_steps=64, batch_size=32, device="cpu", seed=0)
    before = copy.deepcopy(model.policy.state_dict())
    improved = improver.step(SB3Actor(model.policy), experience)
    assert type(improved.policy) is type(model.policy)
    assert all(torch.equal(before[k], v) for k, v in model.policy.state_dict().items())  # input untouched
    assert any(not torch.equal(before[k], v) for k, v in improved.policy.state_dict().items())
    improve_sb3(improver, model, experience)
    assert any(not torch.equal(before[k], v) for k, v in model.policy.state_dict().items())
    action, _ = model.predict(experience.observations[0, 0].numpy(), deterministic=True)
    assert action.shape == (2,)
