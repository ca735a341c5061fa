import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from improver.network import NetworkConfig
from improver.operator import BehaviourPolicy, Improver, checked
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
    with pytest.raises(ValueError, match=r"to \[B, 2\] actions; for a batch of 1 it returned \(1, 3\)"):
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
    from improver.loop import improve, improvement_loop
    from improver.policies import save_policy

    start = MLPPolicy(4, 2)
    final, rows = improve(improver, copy.deepcopy(start), toy.tasks("test")[:2], steps=2, episodes=4)
    assert [r["step"] for r in rows] == [0, 1, 2] and isinstance(final, MLPPolicy)
    assert [r["env_steps"] for r in rows] == [160, 320, 480]
    # the rows are the policy's own episodes' figures (parameters mode: from step 1 the first half of
    # the episodes are the teacher's), and the same start and seed give the same loop
    states = list(improvement_loop(improver, copy.deepcopy(start), toy.tasks("test")[:2], 2, 4))
    own = [slice(None)] + [slice(2, None)] * 2
    assert [(r["success"], r["mean_return"]) for r in rows] == [
        (float(s.experience.success[o].float().mean()), float(s.experience.returns[o].mean())) for s, o in zip(states, own)
    ]
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


def padded(experience, fill):
    """``experience`` with episodes cut short (lengths 40, 31, 25, ...) and ``fill`` on every padding step."""
    lengths = torch.tensor([40, 31, 25, 40, 12, 1])[: experience.num_episodes]
    mask = torch.arange(experience.observations.shape[1])[None, :] < lengths[:, None]
    pad = (~mask)[..., None]
    return replace(
        experience,
        observations=experience.observations.masked_fill(pad, fill),
        actions=experience.actions.masked_fill(pad, fill),
        rewards=experience.rewards.masked_fill(~mask, fill),
        successes=experience.successes | ~mask,
        mask=mask,
    )


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e30])
def test_padding_gives_exactly_the_result_of_zero_padding(improver, experience, fill):
    policy = MLPPolicy(4, 2)
    zeros, garbage = padded(experience, 0.0), padded(experience, fill)
    assert torch.equal(improver.step(policy, garbage, mode="behaviour").z, improver.step(policy, zeros, mode="behaviour").z)
    a, b = improver.step(policy, garbage).state_dict(), improver.step(policy, zeros).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_padding_gives_exactly_the_result_of_zero_padding_with_a_ranking_reward(improver, experience, toy):
    from improver.augment.drex import NoiseLadder, ranked_family
    from improver.augment.ranking_reward import RewardModelConfig, train_reward_model

    family = ranked_family(toy.expert, toy.tasks("train")[:2], NoiseLadder((1.0, 0.0)), 1, seed=0)
    with_rm = copy.deepcopy(improver)
    with_rm.reward_model = train_reward_model(family.trajectory, family.ranks, RewardModelConfig(steps=2, pairs=20, snippet=(5, 10)), progress=False)
    zeros, garbage = (replace(padded(experience, fill), rewards=None) for fill in (0.0, float("nan")))
    assert torch.equal(with_rm.reward_model.predict(garbage), with_rm.reward_model.predict(zeros))
    policy = MLPPolicy(4, 2)
    assert torch.equal(with_rm.step(policy, garbage, mode="behaviour").z, with_rm.step(policy, zeros, mode="behaviour").z)


def test_a_step_that_would_return_non_finite_weights_or_actions_raises(improver, experience):
    broken = copy.deepcopy(improver)
    with torch.no_grad():
        broken.net.head.net[-1].bias.fill_(float("nan"))
    policy = MLPPolicy(4, 2)
    before = copy.deepcopy(policy.state_dict())
    with pytest.raises(FloatingPointError, match=r"NaN or infinite weights \(net\.head\.net\.4\.bias\); the input policy is unchanged"):
        broken.step(policy, experience, mode="behaviour")
    with pytest.raises(FloatingPointError, match=r"NaN or infinite weights \(net\.0\.weight"):
        broken.step(policy, experience)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    overflowing = nn.Linear(4, 2)  # finite weights whose actions overflow to infinity
    with torch.no_grad():
        overflowing.weight.fill_(3e38)
    with pytest.raises(FloatingPointError, match="infinite actions on the experience's states"):
        checked(overflowing, torch.full((5, 4), 10.0))


def test_a_policy_with_non_finite_actions_is_refused(improver, experience):
    with pytest.raises(ValueError, match="the policy returned NaN, infinite or huge"):
        improver.step(lambda obs: torch.full((len(obs), 2), float("nan")), experience, mode="behaviour")


class BatchNormPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2), nn.Tanh())

    def forward(self, obs):
        return self.net(obs)


@pytest.mark.parametrize("fit_epochs", [0, 2])
def test_a_batchnorm_policy_in_train_mode_is_improved_and_left_alone(improver, experience, fit_epochs):
    policy = BatchNormPolicy().train()
    policy.net[0].eval()  # a submodule's own flag must come back too
    flags = [m.training for m in policy.modules()]
    before = copy.deepcopy(policy.state_dict())
    fitting = copy.deepcopy(improver)
    fitting.fit_epochs = fit_epochs
    fitting.context(policy, experience)
    behaviour = fitting.step(policy, experience, mode="behaviour")
    improved = fitting.step(policy, experience)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # running stats and their count too
    assert [m.training for m in policy.modules()] == flags
    assert isinstance(behaviour, BehaviourPolicy) and type(improved) is BatchNormPolicy and not improved.training
    assert any(not torch.equal(before[k], v) for k, v in improved.state_dict().items())


@pytest.mark.parametrize("fit_epochs", [0, 2])
def test_a_frozen_policy_is_distilled_and_a_partly_frozen_one_keeps_its_frozen_part(improver, experience, fit_epochs):
    fitting = copy.deepcopy(improver)
    fitting.fit_epochs = fit_epochs
    frozen = MLPPolicy(4, 2).requires_grad_(False)
    improved = fitting.step(frozen, experience)
    assert not any(p.requires_grad for p in frozen.parameters()) and not any(p.requires_grad for p in improved.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(frozen.parameters(), improved.parameters()))
    partly = MLPPolicy(4, 2)
    partly.net[0].requires_grad_(False)
    improved = fitting.step(partly, experience)
    assert torch.equal(improved.net[0].weight, partly.net[0].weight) and not improved.net[0].weight.requires_grad
    assert not torch.equal(improved.net[-2].weight, partly.net[-2].weight) and improved.net[-2].weight.requires_grad


@pytest.mark.parametrize("fit_epochs", [0, 2])
def test_step_works_under_inference_mode(improver, toy, fit_epochs):
    fitting = copy.deepcopy(improver)
    fitting.fit_epochs = fit_epochs
    with torch.inference_mode():
        policy = MLPPolicy(4, 2)
        experience = rollout(policy, toy.tasks("test")[:2], 1, progress=False)
        improved = fitting.step(policy, experience)
        behaviour = fitting.step(policy, experience, mode="behaviour")
        actions = behaviour(experience.observations[:, 0])
    assert type(improved) is MLPPolicy and actions.shape == (2, 2)
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), improved.parameters()))


def test_a_plain_function_needs_behaviour_mode(improver, experience):
    def function(obs):
        return torch.zeros(len(obs), 2)

    with pytest.raises(TypeError, match="needs an nn.Module with parameters; got a function without any: use mode='behaviour'"):
        improver.step(function, experience)
    with pytest.raises(TypeError, match="got a Tanh without any"):
        improver.step(nn.Tanh(), experience)
    assert isinstance(improver.step(function, experience, mode="behaviour"), BehaviourPolicy)


def test_a_policy_on_the_meta_device_is_refused(improver, experience):
    with torch.device("meta"):
        policy = MLPPolicy(4, 2)
    for mode in ("parameters", "behaviour"):
        with pytest.raises(ValueError, match="MLPPolicy policy's parameters are on the meta device .*load its weights first"):
            improver.step(policy, experience, mode=mode)


def test_shipped_usage_is_one_encoder_chunk_so_steps_are_unchanged():
    """Up to 30 episodes of 500 steps (1,500 tokens, memory 3) the chunked encoder is the single-sequence one."""
    from improver.bench import random_experience

    shipped = Improver.from_pretrained("pretrained/push-v3/improver")
    experience = random_experience(shipped, episodes=30)
    policy = MLPPolicy(39, 4)
    chunked = shipped.step(policy, experience, mode="behaviour").z
    shipped.net.chunk_tokens = 10**9  # one chunk whatever the size: the encoder as it was
    assert torch.equal(chunked, shipped.step(policy, experience, mode="behaviour").z)


def test_step_benchmark_command_prints_and_writes_time_and_memory(improver, tmp_path, capsys):
    from improver.cli import main

    improver.save_pretrained(tmp_path / "imp")
    main(["bench", "step", "--improver", str(tmp_path / "imp"), "--episodes", "3", "--modes", "behaviour", "--steps", "20",
          "--chunk-tokens", "4", "--out", str(tmp_path / "step.json")])
    assert "peak MB" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert row["episodes"] == 3 and row["mode"] == "behaviour" and row["chunk_tokens"] == 4
    assert row["seconds"] > 0 and row["peak_mb"] >= row["before_mb"] > 0 and len(row["z"]) == improver.net.context_dim


def test_loop_settings_travel_with_the_checkpoint(tmp_path):
    from improver.loop_settings import LoopSettings

    settings = LoopSettings("behaviour", exploration=0.3, task_exploration=0.04, wide_task_exploration=0.08, memory=2)
    Improver(NetworkConfig(4, 2, width=16, task_dim=2), distill_steps=2, loop_settings=settings).save_pretrained(tmp_path / "imp")
    assert Improver.from_pretrained(tmp_path / "imp").loop_settings == settings
    # a checkpoint from before the settings existed loads as a bare improver
    config = json.loads((tmp_path / "imp" / "config.json").read_text())
    del config["loop_settings"]
    (tmp_path / "imp" / "config.json").write_text(json.dumps(config))
    assert Improver.from_pretrained(tmp_path / "imp").loop_settings == LoopSettings("parameters", 0.0, 0.0, 0.0, 1)
    for bad, message in (({"mode": "fast"}, "mode must be"), ({"speed": 1}, r"unknown keys \['speed'\]"), ({"memory": 0}, "memory must be")):
        (tmp_path / "imp" / "config.json").write_text(json.dumps({**config, "loop_settings": bad}))
        with pytest.raises(ValueError, match=message):
            Improver.from_pretrained(tmp_path / "imp")
    with pytest.raises(ValueError, match="task_exploration needs mode='behaviour'"):
        LoopSettings(task_exploration=0.04)
    with pytest.raises(ValueError, match="need an improver that infers the task"):
        Improver(NetworkConfig(4, 2, width=16), loop_settings=settings)


def test_shipped_improvers_carry_their_documented_loop_settings():
    from improver.loop_settings import LoopSettings

    assert Improver.from_pretrained("pretrained/push-v3/improver").loop_settings == LoopSettings("behaviour", 0.3, 0.04, 0.08, 1)
    assert Improver.from_pretrained("pretrained/reach-v3/improver").loop_settings == LoopSettings("behaviour", 0.3, 0.0, 0.0, 1)
    assert Improver.from_pretrained("pretrained/pick-place-v3/improver").loop_settings == LoopSettings("behaviour", 0.3, 0.04, 0.08, 1)


def test_a_shipped_improver_of_the_old_layout_still_infers_the_task_and_acts(tmp_path):
    from safetensors.torch import load_file

    from improver.bench import random_experience
    from improver.task_inference import BOUND, GoalLocator

    path = Path("pretrained/reach-v3/improver")
    assert "task_inference" not in json.loads((path / "config.json").read_text())["network"]  # written before the choice existed
    stored = load_file(path / "model.safetensors")
    assert {"net.task_mean", "net.task_std", "net.locator.point.weight"} <= stored.keys()  # and before the keys moved
    improver = Improver.from_pretrained(path)
    inference = improver.net.task_inference
    assert isinstance(inference, GoalLocator) and improver.config.task_inference == "goal-locator"
    assert improver.net.context_dim == 64 + 2 * 3  # as trained: the summary, then the goal estimate and vote
    assert torch.equal(inference.point.weight, stored["net.locator.point.weight"]) and torch.equal(inference.task_std, stored["net.task_std"])
    experience = random_experience(improver, 2, steps=100)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        policy = MLPPolicy(39, 4)
    behaviour = improver.step(policy, experience, mode="behaviour")
    estimate = improver.net.task_estimate(behaviour.z)
    assert behaviour.z.shape == (70,) and behaviour.z.isfinite().all()
    assert estimate.isfinite().all() and (inference.normalize(estimate).abs() <= BOUND + 1e-5).all()
    actions = behaviour(experience.observations[0])
    assert actions.shape == (100, 4) and actions.isfinite().all()
    # saved again, it is written under the keys of now and reads back the same
    improver.save_pretrained(tmp_path / "resaved")
    assert "net.task_inference.point.weight" in load_file(tmp_path / "resaved" / "model.safetensors")
    reloaded = Improver.from_pretrained(tmp_path / "resaved")
    assert torch.equal(reloaded.step(policy, experience, mode="behaviour").z, behaviour.z)
