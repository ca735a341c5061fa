import pytest
import torch

from improver.augment.dataset import ImprovementDataset
from improver.meta_train import MetaTrainConfig, meta_train
from improver.network import NetworkConfig
from improver.operator import Improver
from improver.loop_settings import LoopSettings
from improver.refine import RefineConfig, refine_locator


@pytest.fixture(scope="module")
def locating(toy_dataset, tmp_path_factory):
    """A toy improver that infers the task with the goal locator, briefly meta-trained."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        improver = Improver(NetworkConfig(4, 2, width=16, token_stride=1, task_dim=2), distill_steps=3)
    config = MetaTrainConfig(steps=20, batch_size=3, distill_weight=0.0)
    return meta_train(improver, ImprovementDataset(toy_dataset), config, tmp_path_factory.mktemp("meta"), progress=False).net.state_dict()


def copy_of(state):
    improver = Improver(NetworkConfig(4, 2, width=16, token_stride=1, task_dim=2), distill_steps=3)
    improver.net.load_state_dict(state)
    return improver


CONFIG = RefineConfig(loop_steps=1, episodes=2, max_success=1.0, steps=40, batch_size=4)


def test_refining_fits_only_the_task_inference_to_the_loops_own_episodes(toy_dataset, locating, tmp_path):
    data = ImprovementDataset(toy_dataset)
    refined, scores = refine_locator(copy_of(locating), data, CONFIG, tmp_path, progress=False)
    tasks = {data.example(i).lesser.tasks[0].index for i in range(len(data))}
    assert sorted(p.name for p in (tmp_path / "episodes").iterdir()) == [f"task-{t:04d}.h5" for t in sorted(tasks)]
    assert scores["experiences"] == 2 * len(tasks)  # steps 0 and 1 of each task's loop
    assert scores["error_after"] < scores["error_before"]
    changed = {name for name, value in refined.net.state_dict().items() if not torch.equal(value, locating[name])}
    assert changed and all(name.startswith("task_inference.") for name in changed)
    reloaded = Improver.from_pretrained(tmp_path / "improver")
    torch.testing.assert_close(reloaded.net.state_dict(), refined.net.state_dict())
    # it carries the loop it was refined in as its default
    assert reloaded.loop_settings == LoopSettings("behaviour", CONFIG.exploration, CONFIG.task_exploration, CONFIG.wide_task_exploration)

    # A rerun (as after a kill) reuses the episodes on disk and fits the same task inference.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "episodes").iterdir()}
    again, _ = refine_locator(copy_of(locating), data, CONFIG, tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "episodes").iterdir()} == stamps
    torch.testing.assert_close(again.net.state_dict(), refined.net.state_dict())


def test_refining_needs_an_improver_that_infers_the_task(toy_dataset, tmp_path):
    with pytest.raises(ValueError, match="infers no task .* no task inference to refine"):
        refine_locator(Improver(NetworkConfig(4, 2, width=16)), ImprovementDataset(toy_dataset), CONFIG, tmp_path, progress=False)
    assert not (tmp_path / "improver").exists()


def test_refine_locator_command(toy_dataset, locating, tmp_path, capsys):
    import json

    from improver.cli import main

    copy_of(locating).save_pretrained(tmp_path / "meta", metadata={"meta_train": {"steps": 20}})
    args = ["refine-locator", "--improver", str(tmp_path / "meta"), "--data", str(toy_dataset), "--out", str(tmp_path / "run"),
            "--loop-steps", "1", "--episodes", "2", "--steps", "5"]
    with pytest.raises(ValueError, match="no lesser policy"):
        main([*args, "--max-success", "-1"])
    main([*args, "--max-success", "1"])
    assert "task inference error on the" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "improver" / "config.json").read_text())["metadata"]
    assert record["source_metadata"] == {"meta_train": {"steps": 20}} and record["refine_locator"]["loop_steps"] == 1


def test_success_steps_pull_the_locators_points_onto_the_goal(toy, locating):
    from improver.meta_train import task_error, task_target
    from improver.refine import refine_error
    from improver.tasks import rollout

    net = copy_of(locating).net
    task = toy.tasks("test")[0]
    succeeding = rollout(toy.expert, task, 1, progress=False)
    failing = rollout(lambda obs: torch.zeros(len(obs), 2), task, 1, progress=False)
    assert succeeding.successes.any() and not failing.successes.any()
    obs, _, successes, valid = net.task_inputs(succeeding)
    points = net.task_inference.point(obs[(successes > 0) & valid])
    assert len(points) == int(succeeding.successes[0, : succeeding.observations.shape[1]].sum())  # token stride 1
    expected = ((points - task_target(net, succeeding)) ** 2).sum(dim=-1).mean()
    torch.testing.assert_close(refine_error(net, succeeding, 2.0), task_error(net, succeeding) + 2.0 * expected)
    torch.testing.assert_close(refine_error(net, failing, 2.0), task_error(net, failing))


def test_a_reward_free_improver_is_refined_on_its_ranking_rewards(toy_dataset, locating, tmp_path):
    from improver.augment.ranking_reward import RewardModelConfig, train_reward_model

    data = ImprovementDataset(toy_dataset)
    lesser = data.example(0).lesser
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = train_reward_model(lesser, torch.arange(lesser.num_episodes, dtype=torch.float32),
                                   RewardModelConfig(steps=5, pairs=20, snippet=(5, 10)), progress=False).requires_grad_(False)
    blind = copy_of(locating)
    blind.reward_free, blind.reward_model = True, model
    _, env_scores = refine_locator(copy_of(locating), data, CONFIG, tmp_path, progress=False)
    _, blind_scores = refine_locator(blind, data, CONFIG, tmp_path, progress=False)
    # Same episodes on disk, different rewards read: the task inference is judged (and fitted) on the model's.
    assert blind_scores["experiences"] == env_scores["experiences"]
    assert blind_scores["error_before"] != pytest.approx(env_scores["error_before"])
    blind.reward_model = None
    with pytest.raises(ValueError, match="reward-free"):
        refine_locator(blind, data, CONFIG, tmp_path / "again", progress=False)


def test_refinement_collects_under_the_wide_task_exploration_rule(toy_dataset, locating, tmp_path):
    from improver.refine import read_loop_episodes, collect_loop_episodes

    data = ImprovementDataset(toy_dataset)
    narrow = RefineConfig(loop_steps=1, episodes=2, max_success=0.0)
    wide = RefineConfig(loop_steps=1, episodes=2, max_success=0.0, wide_task_exploration=0.5)
    for name, config in [("narrow", narrow), ("wide", wide)]:
        collect_loop_episodes(copy_of(locating), data, config, tmp_path / name, progress=False)
    files = sorted(p.name for p in (tmp_path / "narrow").iterdir())
    assert files
    for name in files:
        (start, step1), (start_wide, step1_wide) = read_loop_episodes(tmp_path / "narrow" / name), read_loop_episodes(tmp_path / "wide" / name)
        assert not start.success.any()  # step 1 follows a failed step: it aims with the wide noise
        torch.testing.assert_close(start.observations, start_wide.observations)
        assert not torch.allclose(step1.actions, step1_wide.actions)


def test_fitting_the_head_moves_only_the_head_toward_the_experts_actions_on_the_loops_states(toy, toy_dataset, locating, tmp_path):
    import h5py

    from improver.refine import read_loop_episodes
    from improver.tasks.rollout import relabel

    data = ImprovementDataset(toy_dataset)
    config = RefineConfig(loop_steps=1, episodes=2, max_success=1.0, steps=0, head_steps=60, head_lr=3e-3, head_batch_size=64)
    refined, scores = refine_locator(copy_of(locating), data, config, tmp_path, progress=False)
    assert scores["head_mse_after"] < scores["head_mse_before"]
    changed = {name for name, value in refined.net.state_dict().items() if not torch.equal(value, locating[name])}
    assert changed and all(name.startswith("head.") for name in changed)
    files = sorted((tmp_path / "episodes").iterdir())
    with h5py.File(files[0], "r") as f:
        assert "context" not in f["0"] and f["1"]["context"].shape == (refined.net.context_dim,)
        experience = read_loop_episodes(files[0])[1]
        torch.testing.assert_close(torch.from_numpy(f["1"]["expert_actions"][()]), relabel(toy.expert, experience))
    assert scores["head_states"] == sum(int(read_loop_episodes(p)[1].mask.sum()) for p in files)

    # Episodes collected before the expert's actions were stored cannot train the head.
    with h5py.File(files[0], "a") as f:
        del f["1"]["expert_actions"]
    with pytest.raises(ValueError, match="without the expert's actions"):
        refine_locator(copy_of(locating), data, config, tmp_path, progress=False)


def test_the_aim_offset_moves_the_inferred_task_and_is_saved(toy, locating, tmp_path):
    from improver.tasks import rollout

    improver = copy_of(locating)
    experience = rollout(toy.expert, toy.tasks("test")[0], 2, progress=False)
    policy = torch.nn.Linear(4, 2)
    plain = improver.context(policy, experience)
    improver.aim_offset = (0.1, -0.2)
    moved = improver.context(policy, experience)
    torch.testing.assert_close(improver.net.task_estimate(moved) - improver.net.task_estimate(plain), torch.tensor([0.1, -0.2]))
    improver.save_pretrained(tmp_path / "aimed")
    assert Improver.from_pretrained(tmp_path / "aimed").aim_offset == (0.1, -0.2)
    with pytest.raises(ValueError, match="one finite number per task parameter"):
        Improver(NetworkConfig(4, 2, width=16, task_dim=2), aim_offset=(0.1,))


def test_the_aim_is_calibrated_on_the_training_tasks_returns(toy, toy_dataset, locating, tmp_path):
    from improver.operator import BehaviourPolicy
    from improver.refine import calibrate_aim, collect_loop_episodes, read_loop_episodes
    from improver.tasks import rollout

    improver = copy_of(locating)
    improver.aim_offset = (0.05, 0.0)  # what the collecting improver added: the result adds to it
    collect_loop_episodes(improver, ImprovementDataset(toy_dataset), CONFIG, tmp_path, progress=False)
    offset, returns = calibrate_aim(improver, tmp_path, (-0.3, 0.3), progress=False)
    assert len(returns) == 1 + 2 * 2
    # The kept offset is the best one tried: recompute its return from each task's last context.
    import h5py

    total = 0.0
    files = sorted(tmp_path.glob("task-*.h5"))
    for path in files:
        with h5py.File(path, "r") as f:
            z = torch.from_numpy(f["1"]["context"][()])
        info = read_loop_episodes(path)[1].tasks[0]
        chosen = torch.tensor(offset) - torch.tensor([0.05, 0.0])
        policy = BehaviourPolicy(improver.net, improver.net.shifted(z, chosen))
        total += float(rollout(policy, toy.tasks(info.split)[info.index], 1, seed=0, progress=False).returns.mean())
    assert total / len(files) == pytest.approx(max(returns), rel=1e-5)


def test_a_learned_task_encoder_is_refined_through_the_same_interface(toy_dataset, tmp_path):
    from improver.meta_train import fit_normalization

    data = ImprovementDataset(toy_dataset)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        improver = Improver(NetworkConfig(4, 2, width=16, token_stride=1, task_dim=2, task_inference="learned"), distill_steps=3)
    fit_normalization(improver, data)
    start = {k: v.clone() for k, v in improver.net.state_dict().items()}
    config = RefineConfig(loop_steps=1, episodes=2, max_success=1.0, steps=40, batch_size=4, head_steps=5, head_batch_size=64)
    refined, scores = refine_locator(improver, data, config, tmp_path, progress=False)
    assert scores["error_after"] < scores["error_before"] and scores["head_mse_after"] < scores["head_mse_before"]
    changed = {name for name, value in refined.net.state_dict().items() if not torch.equal(value, start[name])}
    assert changed and all(name.startswith(("task_inference.", "head.")) for name in changed)
    assert Improver.from_pretrained(tmp_path / "improver").config.task_inference == "learned"
