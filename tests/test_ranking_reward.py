import json

import pytest
import torch

from improver.augment.drex import NoiseLadder, ranked_family
from improver.augment.ranking_reward import (
    RewardEnsemble,
    RewardModelConfig,
    fit_on_dataset,
    load_reward_model,
    pair_accuracy,
    return_correlation,
    sample_snippet_pairs,
    save_reward_model,
    train_reward_model,
)
from improver.tasks import RenderConfig

LADDER = NoiseLadder((1.0, 0.75, 0.5, 0.25, 0.0))
FAST = RewardModelConfig(steps=150, pairs=1000, snippet=(5, 20))


@pytest.fixture(scope="module")
def families(toy):
    train = ranked_family(toy.expert, toy.tasks("train")[:8], LADDER, episodes_per_level=2, seed=0)
    held_out = ranked_family(toy.expert, toy.tasks("test"), LADDER, episodes_per_level=2, seed=1)
    return train, held_out


@pytest.fixture(scope="module")
def model(families):
    train, _ = families
    return train_reward_model(train.trajectory, train.ranks, FAST, progress=False)


def test_ranks_held_out_tasks_better_than_an_untrained_model(families, model):
    _, held_out = families
    accuracy = pair_accuracy(model, held_out.trajectory, held_out.ranks)
    correlation = return_correlation(model, held_out.trajectory)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = RewardEnsemble(4, FAST).eval()
    baseline = (pair_accuracy(untrained, held_out.trajectory, held_out.ranks), return_correlation(untrained, held_out.trajectory))
    assert accuracy > 0.85 and correlation > 0.5, (accuracy, correlation, baseline)
    assert accuracy > baseline[0] + 0.15 and correlation > baseline[1] + 0.2, (accuracy, correlation, baseline)


def test_snippets_respect_lengths_and_the_trex_start_rule(families):
    train, _ = families
    rows = sample_snippet_pairs(train.trajectory, train.ranks, 500, (5, 20), torch.Generator().manual_seed(0))
    worse, worse_start, better, better_start, size = rows.T
    lengths = train.trajectory.lengths
    assert (train.ranks[better] > train.ranks[worse]).all()
    assert (worse_start + size <= lengths[worse]).all() and (better_start + size <= lengths[better]).all()
    assert (better_start >= worse_start).all()  # toy episodes share a length
    assert all(train.trajectory.tasks[w].index == train.trajectory.tasks[b].index for w, b in zip(worse, better))


def test_same_seed_same_model_and_round_trip(families, model, tmp_path):
    train, _ = families
    again = train_reward_model(train.trajectory, train.ranks, FAST, progress=False)
    assert torch.equal(model.predict(train.trajectory), again.predict(train.trajectory))
    save_reward_model(model, tmp_path / "rm")
    assert torch.equal(load_reward_model(tmp_path / "rm").predict(train.trajectory), model.predict(train.trajectory))
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"format_version": 1, "obs_dim": 5, "config": json.loads((tmp_path / "rm" / "config.json").read_text())["config"]}))
    with pytest.raises(ValueError, match="do not fit"):
        load_reward_model(tmp_path / "rm")


def test_bad_ranks(families):
    train, _ = families
    t = train.trajectory
    with pytest.raises(ValueError, match="one rank per episode"):
        train_reward_model(t, train.ranks[:-1], FAST, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train_reward_model(t, torch.full_like(train.ranks, float("nan")), FAST, progress=False)
    with pytest.raises(ValueError, match="different rank"):
        train_reward_model(t, torch.zeros_like(train.ranks), FAST, progress=False)


def test_frames_path(toy):
    family = ranked_family(toy.expert, toy.tasks("train")[:2], LADDER, 1, seed=0, render=RenderConfig(every=2, size=16))
    config = RewardModelConfig(steps=5, pairs=50, snippet=(5, 10), use_frames=True)
    model = train_reward_model(family.trajectory, family.ranks, config, progress=False)
    assert model.predict(family.trajectory).shape == family.trajectory.rewards.shape
    plain = ranked_family(toy.expert, toy.tasks("train")[:1], LADDER, 1, seed=0)
    with pytest.raises(ValueError, match="looks at frames"):
        model.predict(plain.trajectory)


def test_fit_on_a_generated_dataset(tmp_path):
    from improver.augment.generate import GenerateConfig, generate

    generate(GenerateConfig("toy:reach2d", preset="tiny"), tmp_path / "data", progress=False)
    report = fit_on_dataset(tmp_path / "data", heldout_tasks=4, config=FAST)
    assert report["heldout_episodes"] == 4 * 3 * 2 and 0.0 <= report["heldout_pair_accuracy"] <= 1.0
    assert load_reward_model(tmp_path / "data" / "reward_model").obs_dim == 4
    assert json.loads((tmp_path / "data" / "reward_model_report.json").read_text())["suite"] == "toy:reach2d"
