import pytest
import torch

from improver.augment.drex import NoiseLadder, check_noise_ranking, ranked_family
from improver.augment.noise import EpsilonGreedy, Gaussian, NoisyPolicy, OrnsteinUhlenbeck, make_noise
from improver.tasks import rollout

ZERO = lambda obs: torch.zeros(len(obs), 2)  # noqa: E731


def test_noise_is_seeded_and_bounded():
    obs = torch.zeros(64, 4)
    for noise in (EpsilonGreedy(0.5), Gaussian(0.3), OrnsteinUhlenbeck(0.3)):
        a, b, c = NoisyPolicy(ZERO, noise, seed=1), NoisyPolicy(ZERO, noise, seed=1), NoisyPolicy(ZERO, noise, seed=2)
        x, y, z = a(obs), b(obs), c(obs)
        assert torch.equal(x, y) and not torch.equal(x, z)
        assert x.abs().max() <= 1.0 and x.abs().sum() > 0


def test_epsilon_greedy_replaces_the_expected_fraction():
    actions = NoisyPolicy(ZERO, EpsilonGreedy(0.25), seed=0)(torch.zeros(4000, 4))
    replaced = (actions != 0).any(dim=1).float().mean()
    assert 0.22 < replaced < 0.28


def test_ou_noise_is_correlated_in_time():
    policy = NoisyPolicy(ZERO, OrnsteinUhlenbeck(0.2), seed=0)
    steps = torch.stack([policy(torch.zeros(256, 4)) for _ in range(30)])
    lag1 = torch.corrcoef(torch.stack([steps[10:-1].flatten(), steps[11:].flatten()]))[0, 1]
    assert lag1 > 0.6
    white = NoisyPolicy(ZERO, Gaussian(0.2), seed=0)
    steps = torch.stack([white(torch.zeros(256, 4)) for _ in range(30)])
    assert torch.corrcoef(torch.stack([steps[:-1].flatten(), steps[1:].flatten()]))[0, 1].abs() < 0.1


def test_noises_compose_and_bind_to_tasks(toy):
    clean = rollout(toy.expert, toy.tasks("test")[:2], 1, progress=False)
    stacked = NoisyPolicy(NoisyPolicy(toy.expert, Gaussian(0.2), seed=3), EpsilonGreedy(0.3), seed=4)
    a = rollout(stacked, toy.tasks("test")[:2], 1, progress=False)
    b = rollout(stacked, toy.tasks("test")[:2], 1, num_envs=1, progress=False)
    assert torch.equal(a.actions, b.actions)  # an episode's noise does not depend on its batch
    assert not torch.equal(a.actions, clean.actions)


def test_bad_noise_levels():
    with pytest.raises(ValueError, match="epsilon must be in"):
        EpsilonGreedy(1.5)
    with pytest.raises(ValueError, match="sigma"):
        Gaussian(-0.1)
    with pytest.raises(ValueError, match="unknown noise"):
        make_noise("pink", 0.1)
    with pytest.raises(ValueError, match="at least two"):
        NoiseLadder((0.5,))


def test_evenly_spaced_ladder():
    ladder = NoiseLadder.evenly(20)
    assert len(ladder.levels) == 20 and ladder.levels[0] == 1.0 and abs(ladder.levels[-1] - 0.02) < 1e-12


def test_ranked_family_and_drex_check_on_toy(toy):
    family = ranked_family(toy.expert, toy.tasks("train")[:3], NoiseLadder(), episodes_per_level=2, seed=0)
    assert family.trajectory.num_episodes == 5 * 3 * 2
    assert family.levels.tolist()[:6] == [1.0] * 6 and torch.equal(family.ranks, -family.levels)
    rows = check_noise_ranking(family)
    assert len(rows) == 3 and all(r["holds"] and r["rho_return"] < -0.5 for r in rows)


def test_drex_check_flags_a_task_where_noise_helps(toy):
    # Lying about the levels (reversed) must make the check fail, and warn.
    family = ranked_family(toy.expert, toy.tasks("train")[:1], NoiseLadder(), episodes_per_level=2, seed=0)
    from improver.augment.drex import RankedFamily

    liar = RankedFamily(family.trajectory, family.levels.flip(0))
    with pytest.warns(UserWarning, match="fails on 1 task"):
        rows = check_noise_ranking(liar)
    assert not rows[0]["holds"] and rows[0]["rho_return"] > 0
