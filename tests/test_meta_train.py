import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from improver.augment.dataset import ImprovementDataset
from improver.meta_train import MetaTrainConfig, example_loss, fit_normalization, meta_train
from improver.network import NetworkConfig
from improver.operator import Improver


def fresh_improver():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Improver(NetworkConfig(4, 2, width=16), distill_steps=3)


def mean_loss(improver, data):
    generator = torch.Generator().manual_seed(0)
    return sum(example_loss(improver, data.example(i), MetaTrainConfig(distill_states=64), generator)[0].item() for i in range(len(data))) / len(data)


def test_meta_training_lowers_the_loss(toy_dataset, tmp_path):
    data = ImprovementDataset(toy_dataset)
    improver = fresh_improver()
    fit_normalization(improver, data)
    before = mean_loss(improver, data)
    trained = meta_train(fresh_improver(), data, MetaTrainConfig(steps=40, batch_size=3, lr=3e-3, distill_states=64), tmp_path, progress=False)
    assert mean_loss(trained, data) < 0.8 * before
    assert (tmp_path / "improver" / "model.safetensors").is_file() and (tmp_path / "checkpoints" / "latest").is_dir()
    assert any(p.name.startswith("events") for p in (tmp_path / "meta_train").iterdir())  # TensorBoard


def test_validation_measures_held_out_success_after_a_step(toy_dataset, tmp_path):
    from improver.augment.generate import GenerateConfig, generate

    generate(GenerateConfig("toy:reach2d", split="test", preset="tiny"), tmp_path / "heldout", progress=False)
    validation = ImprovementDataset(tmp_path / "heldout")
    assert {validation.example(i).lesser.tasks[0].split for i in range(len(validation))} == {"test"}
    config = MetaTrainConfig(steps=2, batch_size=2, distill_states=32, validate_every=1)
    trained = meta_train(fresh_improver(), ImprovementDataset(toy_dataset), config, tmp_path / "run", progress=False, validation=validation)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from improver.loop import heldout_success

    events = EventAccumulator(str(tmp_path / "run" / "meta_train")).Reload()
    logged = {key: [e.value for e in events.Scalars(f"val/{key}")] for key in ("success_before", "success_after")}
    assert len(logged["success_after"]) == 2
    # the last validation is the returned improver's; the lesser policies' own success does not depend on the improver
    expected = heldout_success(trained, validation, seed=config.seed)
    assert logged["success_after"][-1] == pytest.approx(expected["success_after"])
    assert logged["success_before"] == pytest.approx([expected["success_before"]] * 2)


def cli(data, out, *extra):
    return [
        sys.executable, "-m", "improver.cli", "meta-train", "--data", str(data), "--out", str(out),
        "--steps", "24", "--batch-size", "2", "--checkpoint-every", "2", "--width", "16", *extra,
    ]


def test_killed_meta_training_resumes_to_the_same_result(toy_dataset, tmp_path):
    subprocess.run(cli(toy_dataset, tmp_path / "straight"), check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(cli(toy_dataset, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "latest").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "improver").exists(), "the kill should land before the end"
    subprocess.run(cli(toy_dataset, killed), check=True, capture_output=True)
    a = load_file(tmp_path / "straight" / "improver" / "model.safetensors")
    b = load_file(killed / "improver" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_take_the_same_step_as_one(toy_dataset, tmp_path):
    # One step: the gradient summed over two processes equals one process's up to float order.
    # Over many steps Adam's normalisation amplifies those 1e-7 differences, so compare one.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    one = cli(toy_dataset, tmp_path / "one", "--steps", "1")
    two = launch + ["-m"] + cli(toy_dataset, tmp_path / "two", "--steps", "1")[2:]
    subprocess.run(one, check=True, capture_output=True)
    subprocess.run(two, check=True, capture_output=True, timeout=300)
    a = load_file(tmp_path / "one" / "improver" / "model.safetensors")
    b = load_file(tmp_path / "two" / "improver" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_reward_free_meta_training_reads_the_ranking_reward_everywhere(toy_dataset, tmp_path):
    from improver.augment.ranking_reward import RewardModelConfig, train_reward_model

    data = ImprovementDataset(toy_dataset)
    example = data.example(0)
    model = train_reward_model(example.lesser, torch.arange(example.lesser.num_episodes, dtype=torch.float32),
                               RewardModelConfig(steps=5, pairs=20, snippet=(5, 10)), progress=False).requires_grad_(False)
    improver = Improver(NetworkConfig(4, 2, width=16), distill_steps=3, reward_free=True)
    with pytest.raises(ValueError, match="reward-free"):
        improver.scored(example.lesser)
    improver.reward_model = model
    trained = meta_train(improver, data, MetaTrainConfig(steps=3, batch_size=2, distill_states=16), tmp_path, progress=False)
    # The reward scale comes from the model's rewards, not the environment's.
    model_rewards = model.predict(example.lesser)[example.lesser.mask].abs().max()
    assert trained.net.reward_scale >= model_rewards - 1e-6
    assert not torch.isclose(trained.net.reward_scale, data.example(0).lesser.rewards.abs().max())
    reloaded = Improver.from_pretrained(tmp_path / "improver")
    assert reloaded.reward_free and reloaded.reward_model is not None
    # With or without the environment's rewards, a step sees the same context.
    policy = example.policy
    torch.testing.assert_close(reloaded.context(policy, reloaded.scored(example.lesser)),
                               reloaded.context(policy, reloaded.scored(replace(example.lesser, rewards=None))))


def test_the_task_inference_also_learns_from_each_tasks_noise_ladder(toy_dataset, tmp_path):
    from improver.meta_train import noise_ladders

    data = ImprovementDataset(toy_dataset)
    improver = Improver(NetworkConfig(4, 2, width=16, task_dim=2), distill_steps=3)
    fit_normalization(improver, data)
    ladders = noise_ladders(improver, data)
    example = data.example(0)
    ladder = ladders[example.lesser.tasks[0].index]
    assert {info.index for info in ladder.tasks} == {example.lesser.tasks[0].index} and ladder.num_episodes > 1
    config = MetaTrainConfig(distill_weight=0.0, task_forcing=None)
    plain = example_loss(improver, example, config, torch.Generator().manual_seed(0))[1]["task_mse"]
    both = example_loss(improver, example, config, torch.Generator().manual_seed(0), locate_also=ladder)[1]["task_mse"]
    inferred = improver.net.infer_task(ladder).unflatten(-1, (2, -1))  # the goal locator's estimate and vote
    truth = (torch.tensor(example.lesser.tasks[0].parameters) - improver.net.task_inference.task_mean) / improver.net.task_inference.task_std
    assert both == pytest.approx((plain + torch.nn.functional.mse_loss(inferred, truth.expand(2, -1)).item()) / 2, rel=1e-4)


def inference_error(improver, data):
    """Mean distance of the estimate from the true task parameters over the dataset's lesser experiences (their units)."""
    from improver.task_inference import task_parameters

    net = improver.net
    with torch.no_grad():
        errors = [(net.task_inference.estimate(net.infer_task(data.example(i).lesser)) - task_parameters(data.example(i).lesser.tasks[0])).norm()
                  for i in range(len(data))]
    return float(torch.stack(errors).mean())


def test_meta_training_the_learned_task_encoder_lowers_its_error(toy_dataset, tmp_path):
    from improver.meta_train import build_improver
    from improver.task_inference import LearnedTaskEncoder, task_parameters

    data = ImprovementDataset(toy_dataset)
    improver = build_improver(data, width=16, token_stride=1, task_inference="learned", seed=0)
    assert isinstance(improver.net.task_inference, LearnedTaskEncoder) and improver.config.task_dim == 2
    fit_normalization(improver, data)
    before = inference_error(improver, data)
    parameters = torch.stack([task_parameters(data.example(i).lesser.tasks[0]) for i in range(len(data))])
    mean = float((parameters - parameters.mean(dim=0)).norm(dim=-1).mean())
    config = MetaTrainConfig(steps=60, batch_size=3, distill_weight=0.0, checkpoint_every=60)
    trained = meta_train(improver, data, config, tmp_path, progress=False)
    after = inference_error(trained, data)
    print(f"learned encoder's error on the training tasks: {before:.3f} -> {after:.3f} (the tasks' mean: {mean:.3f})")
    assert after < 0.5 * before and after < 0.5 * mean
    reloaded = Improver.from_pretrained(tmp_path / "improver")
    assert reloaded.config.task_inference == "learned"
    assert inference_error(reloaded, data) == pytest.approx(after)


def test_build_improver_reads_the_sizes_from_the_dataset(toy_dataset):
    from improver.meta_train import build_improver

    data = ImprovementDataset(toy_dataset)
    improver = build_improver(data, width=16, distill_steps=4, fit_epochs=0, seed=3)
    assert (improver.config.obs_dim, improver.config.act_dim, improver.config.task_dim) == (4, 2, 2)
    assert improver.config.task_inference == "goal-locator" and improver.distill_steps == 4 and improver.fit_epochs == 0
    again = build_improver(data, width=16, distill_steps=4, fit_epochs=0, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(improver.state_dict().values(), again.state_dict().values()))  # seeded
    bare = build_improver(data, width=16, task_inference=None, reward_free=True)
    assert bare.config.task_dim == 0 and bare.net.task_inference is None and bare.reward_free and bare.fit_epochs == 20


SHORT = MetaTrainConfig(steps=2, batch_size=2, distill_states=16, checkpoint_every=1)


@pytest.fixture(scope="module")
def finished_run(toy_dataset, tmp_path_factory):
    """A run folder of SHORT, finished (with its checkpoint at step 2 and OUT/improver)."""
    out = tmp_path_factory.mktemp("run") / "out"
    meta_train(fresh_improver(), ImprovementDataset(toy_dataset), SHORT, out, progress=False)
    return out


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "out")
    return tmp_path / "out"


def snapshot(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


class Planted:
    """Unpickling this creates the file ``marker``: a stand-in for code a planted pickle would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("folder", ["checkpoints/latest", "checkpoints/previous"])
def test_a_planted_pickle_is_never_loaded_nor_deleted(finished_run, toy_dataset, tmp_path, folder):
    out = copy_of(finished_run, tmp_path)
    (out / folder).mkdir(exist_ok=True)
    marker = tmp_path / "code-ran"
    for name in ("custom_checkpoint_0.pkl", "pytorch_model.bin"):
        (out / folder / name).write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ValueError, match=f"{folder}.*custom_checkpoint_0.pkl.*did not write"):
        meta_train(fresh_improver(), ImprovementDataset(toy_dataset), replace(SHORT, steps=3), out, progress=False)
    assert not marker.exists()
    assert (out / folder / "custom_checkpoint_0.pkl").is_file() and (out / folder / "pytorch_model.bin").is_file()


def test_a_run_folder_of_the_accelerate_format_is_refused(toy_dataset, tmp_path):
    out = tmp_path / "old"
    (out / "checkpoints" / "latest").mkdir(parents=True)
    marker = tmp_path / "code-ran"
    (out / "checkpoints" / "latest" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ValueError, match="older version.*cannot be resumed safely"):
        meta_train(fresh_improver(), ImprovementDataset(toy_dataset), SHORT, out, progress=False)
    assert not marker.exists() and not (out / "settings.json").exists()


@pytest.mark.parametrize(
    "name, damage",
    [
        ("improver.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
        ("optimizer.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-10])),
        ("optimizer.safetensors", lambda p: save_file({"0.exp_avg": torch.zeros(3, 3)}, p)),
        ("progress.json", lambda p: p.write_text('{"step": ')),
        ("progress.json", lambda p: p.write_text('{"steps": 2}')),
    ],
)
def test_a_damaged_checkpoint_file_is_a_clear_error(finished_run, toy_dataset, tmp_path, name, damage):
    out = copy_of(finished_run, tmp_path)
    damage(out / "checkpoints" / "latest" / name)
    before = snapshot(out)
    with pytest.raises(ValueError, match=f"latest/{name}"):
        meta_train(fresh_improver(), ImprovementDataset(toy_dataset), replace(SHORT, steps=3), out, progress=False)
    assert snapshot(out) == before


@pytest.mark.parametrize("setting", ["lr", "width", "data"])
def test_resuming_with_other_settings_is_refused_and_changes_nothing(finished_run, toy_dataset, tmp_path, setting):
    improver, config, data = fresh_improver(), SHORT, toy_dataset
    if setting == "lr":
        config = replace(SHORT, lr=0.01)
    elif setting == "width":
        improver = Improver(NetworkConfig(4, 2, width=32), distill_steps=3)
    else:
        data = shutil.copytree(toy_dataset, tmp_path / "other-data")
    before = snapshot(finished_run)
    with pytest.raises(ValueError, match=f"was started with {setting}=.*this run asks for {setting}=.*use a new --out"):
        meta_train(improver, ImprovementDataset(data), config, finished_run, progress=False)
    assert snapshot(finished_run) == before


def test_a_run_recorded_under_the_old_setting_names_resumes(finished_run, toy_dataset, tmp_path):
    old = copy_of(finished_run, tmp_path)
    settings = json.loads((old / "settings.json").read_text())
    settings["meta_train"] = {("goal_forcing" if k == "task_forcing" else k): v for k, v in settings["meta_train"].items()}
    del settings["network"]["task_inference"]  # recorded before the choice existed
    (old / "settings.json").write_text(json.dumps(settings))
    data = ImprovementDataset(toy_dataset)
    meta_train(fresh_improver(), data, replace(SHORT, steps=3), old, progress=False)
    meta_train(fresh_improver(), data, replace(SHORT, steps=3), tmp_path / "straight", progress=False)
    a, b = load_file(old / "improver" / "model.safetensors"), load_file(tmp_path / "straight" / "improver" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rewritten = json.loads((old / "settings.json").read_text())
    assert rewritten["meta_train"]["task_forcing"] == SHORT.task_forcing and rewritten["network"]["task_inference"] == "goal-locator"
    # a changed value under the old name is still a change
    settings["meta_train"]["goal_forcing"] = 0.5
    (old / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="was started with task_forcing=0.5"):
        meta_train(fresh_improver(), data, replace(SHORT, steps=4), old, progress=False)


def test_steps_below_the_checkpoint_are_refused(finished_run, toy_dataset):
    before = snapshot(finished_run)
    with pytest.raises(ValueError, match="is at step 2; this run asks for steps=1"):
        meta_train(fresh_improver(), ImprovementDataset(toy_dataset), replace(SHORT, steps=1), finished_run, progress=False)
    assert snapshot(finished_run) == before


def test_extending_the_steps_resumes_to_the_uninterrupted_result(finished_run, toy_dataset, tmp_path):
    extended = copy_of(finished_run, tmp_path)
    data = ImprovementDataset(toy_dataset)
    meta_train(fresh_improver(), data, replace(SHORT, steps=4), extended, progress=False)
    meta_train(fresh_improver(), data, replace(SHORT, steps=4), tmp_path / "straight", progress=False)
    for name in ("improver/model.safetensors", "checkpoints/latest/optimizer.safetensors"):
        a, b = load_file(extended / name), load_file(tmp_path / "straight" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((extended / "settings.json").read_text())["meta_train"]["steps"] == 4
    assert json.loads((extended / "checkpoints" / "latest" / "progress.json").read_text()) == {"step": 4}


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 0), ("lr", 0.0), ("checkpoint_every", 0), ("distill_states", -1),
                                          ("distill_weight", -1.0), ("validate_every", -1)])
def test_bad_meta_training_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"MetaTrainConfig.{field} must be"):
        MetaTrainConfig(**{field: value})


def test_the_command_refuses_zero_steps_before_touching_out(toy_dataset, tmp_path, capsys):
    from improver.cli import main

    # the nested MetaTrainConfig checks itself while the flags are parsed: a usage error (exit 2)
    with pytest.raises(SystemExit) as exit_info:
        main(["meta-train", "--data", str(toy_dataset), "--out", str(tmp_path / "out"), "--steps", "0", "--width", "16"])
    assert exit_info.value.code == 2
    assert "MetaTrainConfig.steps must be positive; got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
