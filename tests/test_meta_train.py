import os
import signal
import subprocess
import sys
import time

import pytest
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
    return sum(example_loss(improver, data.example(i), 64, 1.0, generator)[0].item() for i in range(len(data))) / len(data)


def test_meta_training_lowers_the_loss(toy_dataset, tmp_path):
    data = ImprovementDataset(toy_dataset)
    improver = fresh_improver()
    fit_normalization(improver, data)
    before = mean_loss(improver, data)
    trained = meta_train(fresh_improver(), data, MetaTrainConfig(steps=40, batch_size=3, lr=3e-3, distill_states=64), tmp_path, progress=False)
    assert mean_loss(trained, data) < 0.8 * before
    assert (tmp_path / "improver" / "model.safetensors").is_file() and (tmp_path / "checkpoints" / "latest").is_dir()
    assert any(p.name.startswith("events") for p in (tmp_path / "meta_train").iterdir())  # TensorBoard


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
