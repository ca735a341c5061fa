"""Parameters mode fits every state the loop has visited (DAgger within the loop), and the expert
a dataset imitates is chosen by measurement (smoothed, or raw where smoothing costs success)."""

import pytest
import torch
from metaworld.policies.sawyer_basketball_v3_policy import SawyerBasketballV3Policy

from improver.augment.generate import GenerateConfig, dataset_suite
from improver.loop import DAGGER_ROUNDS, improvement_loop
from improver.network import NetworkConfig
from improver.operator import Improver
from improver.policies import MLPPolicy
from improver.tasks import rollout
from improver.tasks.expert_check import RAW_MARGIN, raw_is_better
from improver.tasks.metaworld_suite import MetaWorldExpert, SmoothedPolicy, SmoothPushPolicy


@pytest.fixture(scope="module")
def improver():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Improver(NetworkConfig(4, 2, width=32), distill_steps=5, fit_epochs=30)


def targets_of(improver, policy, experience, states):
    """The improved behaviour's actions on ``states``, as a parameters step labels them."""
    behaviour = improver.step(policy, experience, mode="behaviour")
    with torch.no_grad():
        return behaviour(states)


def test_extra_states_are_fitted_on(improver, toy):
    policy = MLPPolicy(4, 2)
    experience = rollout(policy, toy.tasks("test")[:2], 2, seed=0, progress=False)
    # states the experience never visited: far from where the policy went
    extra = rollout(MLPPolicy(4, 2), toy.tasks("test")[2:4], 2, seed=1, progress=False)
    extra = extra.observations[extra.mask] + 0.5
    target = targets_of(improver, policy, experience, extra)
    plain = improver.step(policy, experience)
    aggregated = improver.step(policy, experience, extra_states=extra)
    with torch.no_grad():
        error_plain = float(((plain(extra) - target) ** 2).mean())
        error_aggregated = float(((aggregated(extra) - target) ** 2).mean())
    assert error_aggregated < 0.5 * error_plain


def test_extra_states_are_checked(improver, toy):
    policy = MLPPolicy(4, 2)
    experience = rollout(policy, toy.tasks("test")[:1], 1, progress=False)
    with pytest.raises(ValueError, match="parameters mode"):
        improver.step(policy, experience, mode="behaviour", extra_states=torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        improver.step(policy, experience, extra_states=torch.zeros(3, 5))


def test_the_parameters_loop_fits_the_states_of_every_earlier_step(improver, toy, monkeypatch):
    seen = []
    fit_to = Improver.fit_to

    def recording(self, policy, behaviour, states):
        seen.append(len(states))
        return fit_to(self, policy, behaviour, states)

    monkeypatch.setattr(Improver, "fit_to", recording)
    states = [s.experience for s in improvement_loop(improver, MLPPolicy(4, 2), toy.tasks("test")[:2], 3, 2, mode="parameters")]
    sizes = [int(e.mask.sum()) for e in states]
    # step k watches experience k (memory 1) and fits, besides, every state of the steps before it; from
    # step 1 on the copy is also refitted after its own episode (one round: one episode of each 2 is its own)
    assert seen == [sizes[0], sizes[0] + sizes[1], sizes[1] + sizes[0], sum(sizes[:3]), sizes[2] + sizes[0] + sizes[1], sum(sizes)]


def test_the_copy_is_refitted_after_each_round_of_its_own_episodes(improver, toy, monkeypatch):
    seen = []
    fit_to = Improver.fit_to

    def recording(self, policy, behaviour, states):
        seen.append((policy, len(states)))
        return fit_to(self, policy, behaviour, states)

    monkeypatch.setattr(Improver, "fit_to", recording)
    states = list(improvement_loop(improver, MLPPolicy(4, 2), toy.tasks("test")[:2], 2, 10, mode="parameters"))
    sizes = [int(s.experience.mask.sum()) for s in states]
    rounds = [n for _, n in seen[1 : 1 + DAGGER_ROUNDS]]  # step 1: 5 teacher episodes, then 5 own in rounds
    assert len(seen) == 1 + DAGGER_ROUNDS + 1 + DAGGER_ROUNDS
    assert rounds == sorted(set(rounds)) and rounds[-1] == sizes[0] + sizes[1]
    # the step's policy is the copy before the rounds; each round refits the previous round's copy,
    # and the next step's copy starts from the last of them
    assert seen[1][0] is states[1].policy
    assert seen[DAGGER_ROUNDS + 1][0] is not states[1].policy
    assert seen[DAGGER_ROUNDS + 1][1] == sizes[1] + sizes[0]


def test_fit_to_the_behaviour_is_the_parameters_step(improver, toy):
    policy = MLPPolicy(4, 2)
    experience = rollout(policy, toy.tasks("test")[:2], 2, seed=0, progress=False)
    extra = rollout(MLPPolicy(4, 2), toy.tasks("test")[2:3], 1, seed=1, progress=False)
    extra = extra.observations[extra.mask]
    stepped = improver.step(policy, experience, extra_states=extra)
    states = torch.cat([experience.observations[experience.mask], extra])
    fitted = improver.fit_to(policy, improver.step(policy, experience, mode="behaviour"), states)
    for a, b in zip(stepped.parameters(), fitted.parameters()):
        assert torch.equal(a, b)


def test_the_behaviour_loop_passes_no_extra_states(improver, toy, monkeypatch):
    extras = []
    step = Improver.step
    monkeypatch.setattr(
        Improver, "step", lambda self, p, e, mode="parameters", inputs="observations", extra_states=None: extras.append(extra_states) or step(self, p, e, mode, inputs)
    )
    list(improvement_loop(improver, MLPPolicy(4, 2), toy.tasks("test")[:1], 2, 1, mode="behaviour"))
    assert extras == [None, None]


def test_raw_is_better_only_when_smoothing_costs_more_than_the_margin():
    assert raw_is_better(0.0, 0.8)  # basketball-v3, measured: smoothed 0.0, raw 0.8
    assert not raw_is_better(1.0, 1.0)
    assert not raw_is_better(0.8, 0.8 + RAW_MARGIN / 2)
    assert not raw_is_better(0.0, None)  # no raw form to fall back on


def test_unsmoothed_families_get_their_scripted_policy_and_the_rest_keep_theirs():
    expert = MetaWorldExpert().raw(["basketball-v3"])
    assert isinstance(expert.policy("basketball-v3"), SawyerBasketballV3Policy)
    assert isinstance(expert.policy("window-open-v3"), SmoothedPolicy)
    assert isinstance(expert.policy("push-v3"), SmoothPushPolicy)
    assert isinstance(MetaWorldExpert().policy("basketball-v3"), SmoothedPolicy)


def test_dataset_records_raw_families_only_when_there_are_some():
    assert "raw_expert_families" not in GenerateConfig("toy:reach2d").record()  # older datasets keep matching
    config = GenerateConfig("ML1:basketball-v3", raw_expert_families=("basketball-v3",)).record()
    suite = dataset_suite(config)
    assert isinstance(suite.expert.policy("basketball-v3"), SawyerBasketballV3Policy)
    with pytest.raises(ValueError, match="raw form"):
        dataset_suite(GenerateConfig("toy:reach2d", raw_expert_families=("reach2d",)).record())


def test_a_callback_stops_the_loop_by_returning_false_like_stable_baselines3(improver, toy):
    def run(verdict):
        return [s.step for s in improvement_loop(improver, MLPPolicy(4, 2), toy.tasks("test")[:1], 3, 1, callbacks=[lambda s: verdict(s.step)])]

    assert run(lambda k: None) == [0, 1, 2, 3]
    assert run(lambda k: True) == [0, 1, 2, 3]  # True continues, as in SB3's _on_step
    assert run(lambda k: k < 1) == [0, 1]


def test_the_teacher_explores_the_task_as_the_improvers_behaviour_mode_would(toy):
    from dataclasses import replace as replaced

    from improver.loop_settings import LoopSettings

    with torch.random.fork_rng():
        torch.manual_seed(0)
        explorer = Improver(NetworkConfig(4, 2, width=32, task_dim=2), distill_steps=2, fit_epochs=5)
    explorer.loop_settings = LoopSettings("behaviour", 0.0, 0.5, 0.5)
    tasks = toy.tasks("test")[:2]
    states = list(improvement_loop(explorer, MLPPolicy(4, 2), tasks, 1, 2, mode="parameters"))
    teacher = explorer.step(states[0].policy, states[0].experience, mode="behaviour")
    first = states[1].experience  # its first episode is the teacher's, on a shifted task
    obs, acts = first.observations[0, : first.lengths[0]], first.actions[0, : first.lengths[0]]
    with torch.no_grad():
        assert not torch.allclose(teacher(obs), acts, atol=1e-4)
    explorer.loop_settings = replaced(explorer.loop_settings, task_exploration=0.0, wide_task_exploration=0.0)
    states = list(improvement_loop(explorer, MLPPolicy(4, 2), tasks, 1, 2, mode="parameters"))
    teacher = explorer.step(states[0].policy, states[0].experience, mode="behaviour")
    first = states[1].experience
    with torch.no_grad():
        assert torch.allclose(teacher(first.observations[0, : first.lengths[0]]), first.actions[0, : first.lengths[0]], atol=1e-5)


def test_task_sigma_widens_only_after_a_step_that_all_failed():
    from improver.loop_settings import LoopSettings

    assert LoopSettings("behaviour", 0.3, 0.04, 0.08).task_sigma(True) == 0.08
    assert LoopSettings("behaviour", 0.3, 0.04, 0.08).task_sigma(False) == 0.04
    assert LoopSettings("behaviour", 0.3, 0.04).task_sigma(True) == 0.04  # no wide one: the plain one
