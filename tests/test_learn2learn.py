"""learn2learn (built and installed by scripts/setup.sh) and the MAML / Meta-SGD baselines on it."""

from __future__ import annotations

import pytest
import torch

from improver.baselines.bc import collect_exploring, episode_weights, weighted_regression_loss
from improver.baselines.l2l import ALGORITHMS, L2LUpdate, meta_train_l2l
from improver.baselines.maml import maml_steps
from improver.policies import MLPPolicy


def _policy(hidden: tuple[int, ...] = (16, 16)) -> MLPPolicy:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLPPolicy(4, 2, hidden=hidden).eval()


@pytest.fixture(scope="module")
def experience(toy):
    return collect_exploring(_policy(), toy.tasks("test")[:1] * 4, noise=0.3, seed=0)


def test_learn2learn_is_the_version_setup_builds_and_its_compiled_data_module_imports():
    import learn2learn
    import learn2learn.data.task_dataset  # one of the Cython extensions the set-up compiles

    assert learn2learn.__version__ == "0.2.0"
    assert learn2learn.data.task_dataset.__file__.endswith(".so")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_adapt_lowers_the_inner_loss_and_leaves_the_policy_alone(algorithm, experience):
    policy = _policy()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    weights = episode_weights(experience.returns, "rwr", temperature=1.0)
    with torch.no_grad():  # adapt must work under no_grad, as the benchmark calls it
        adapted = L2LUpdate(policy, algorithm, inner_steps=5, lr=0.1).adapt(policy, experience)
        loss_before = float(weighted_regression_loss(policy(experience.observations), experience, weights))
        loss_after = float(weighted_regression_loss(adapted(experience.observations), experience, weights))
    assert loss_after < loss_before - 1e-3
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    # With a zero shift, adapting is exactly learn2learn's inner steps from the policy's own weights.
    update = L2LUpdate(policy, algorithm, inner_steps=5, lr=0.1)
    for a, p in zip(adapted.parameters(), update.adapted_parameters(policy, experience)):
        assert torch.allclose(a, p, atol=1e-6)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_learned_shift_applies_to_the_first_adaptation_only(algorithm, experience):
    policy = _policy()
    update = L2LUpdate(policy, algorithm, inner_steps=1, lr=1e-6)  # the inner step barely moves the weights
    with torch.no_grad():
        for shift in update.learner.module.shift:
            shift.fill_(0.5)
    first = update.adapt(policy, experience)
    later = update.adapt(policy, experience, first=False)
    for p, a, b in zip(policy.parameters(), first.parameters(), later.parameters()):
        assert torch.allclose(a, p + 0.5, atol=1e-4)
        assert torch.allclose(b, p, atol=1e-4)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_second_order_meta_gradient_is_non_zero(algorithm, experience):
    policy = _policy()

    def meta_gradient(first_order: bool) -> dict[str, torch.Tensor]:
        update = L2LUpdate(policy, algorithm, inner_steps=2, lr=0.1, first_order=first_order)
        params = update.adapted_parameters(policy, experience)
        outer = sum((p**2).sum() for p in params)
        outer.backward()
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in update.named_parameters()}

    second, first = meta_gradient(False), meta_gradient(True)
    # The temperature reaches the adapted weights only through the inner gradients: second order only.
    assert second["log_temperature"].abs() > 0 and first["log_temperature"].abs() == 0
    # The shift's gradient carries the Hessian term -lr * H that the first-order version drops.
    shifts = [n for n in second if ".shift." in n]
    assert shifts and all(second[n].abs().sum() > 0 for n in shifts)
    assert any(not torch.allclose(second[n], first[n]) for n in shifts)
    if algorithm == "metasgd":
        rates = [n for n in second if ".lrs." in n]
        assert len(rates) == len(shifts) and all(second[n].abs().sum() > 0 for n in rates)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_meta_train_l2l_learns_saves_and_adapts_like_maml(algorithm, toy, toy_dataset, tmp_path):
    from improver.augment.dataset import ImprovementDataset

    update, report = meta_train_l2l(
        ImprovementDataset(toy_dataset), examples=2, episodes=2, iterations=3, batch_size=2, inner_steps=2, algorithm=algorithm, progress=False
    )
    assert report["second_order"] and report["algorithm"] == algorithm and report["env_steps"] == 2 * 2 * 40
    assert any(s.abs().sum() > 0 for s in update.learner.module.shift)  # the initialisation shift was meta-learned
    assert update.log_temperature.item() != 0.0

    policy = ImprovementDataset(toy_dataset).example(0).policy
    checkpoints = list(maml_steps(update, policy, toy.tasks("test")[:2], steps=2, seed=0))
    assert [c.env_steps for c in checkpoints] == [0, 80, 160] and checkpoints[0].policy is policy

    update.save_pretrained(tmp_path / "update", metadata=report)
    loaded = L2LUpdate.from_pretrained(tmp_path / "update")
    assert loaded.config == update.config
    experience = collect_exploring(policy, toy.tasks("test")[:2], noise=0.3, seed=1)
    for a, b in zip(loaded.adapt(policy, experience).parameters(), update.adapt(policy, experience).parameters()):
        assert torch.allclose(a, b)


def test_l2l_update_refuses_bad_input(experience, tmp_path):
    policy = _policy()
    with pytest.raises(ValueError, match="algorithm must be one of"):
        L2LUpdate(policy, "reptile")
    with pytest.raises(ValueError, match="must be positive"):
        L2LUpdate(policy, lr=0.0)
    with pytest.raises(ValueError, match="parameter shapes"):
        L2LUpdate(policy).adapt(_policy(hidden=(8,)), experience)
    with pytest.raises(FileNotFoundError, match="learn2learn update"):
        L2LUpdate.from_pretrained(tmp_path / "missing")


def test_the_benchmark_runs_both_maml_implementations_and_meta_sgd_on_the_same_starts(toy_dataset, tmp_path):
    import json

    from improver.bench import BenchConfig, run_benchmark
    from improver.network import NetworkConfig
    from improver.operator import Improver
    from improver.policies import save_policy

    with torch.random.fork_rng():
        torch.manual_seed(0)
        Improver(NetworkConfig(4, 2, width=16, token_stride=1), distill_steps=2).save_pretrained(tmp_path / "improver")
        save_policy(MLPPolicy(4, 2), tmp_path / "lesser" / "00", record={"suite": "toy:reach2d", "suite_seed": 0, "split": "test", "index": 0})
    contenders = ("maml", "maml-l2l", "metasgd-l2l")
    config = BenchConfig(
        suite="toy:reach2d", improver=tmp_path / "improver", policies=tmp_path / "lesser", data=toy_dataset, preset="tiny", contenders=contenders
    )
    run_benchmark(config, tmp_path / "bench", progress=False)
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert set(results["table"]) == set(contenders)
    assert results["reports"]["maml-l2l"]["algorithm"] == "maml" and results["reports"]["metasgd-l2l"]["algorithm"] == "metasgd"
    for name in ("maml-l2l_update", "metasgd-l2l_update"):
        assert L2LUpdate.from_pretrained(tmp_path / "bench" / name) is not None
    (unit,) = results["per_unit"]
    # same start, same scoring episodes: every contender's step 0 is the same
    assert len({(r[0]["success"], r[0]["mean_return"]) for r in unit["runs"].values()}) == 1
