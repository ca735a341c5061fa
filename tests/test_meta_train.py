import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

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
    meta_train(fresh_improver(), ImprovementDataset(toy_dataset), config, tmp_path / "run", progress=False, validation=validation)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "meta_train")).Reload()
    tags = events.Tags()["scalars"]
    assert "val/success_after" in tags and "val/success_before" in tags
    values = [e.value for e in events.Scalars("val/success_after")]
    assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)


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
