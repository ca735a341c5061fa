import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader

from improver.augment.dataset import ImprovementDataset, read_manifest
from improver.augment.generate import GenerateConfig, generate
from improver.augment.zoo import ZooRecipe, train_member
from improver.distill import fit_policy
from improver.tasks import relabel

CONFIG = GenerateConfig("toy:reach2d", preset="tiny", seed=0)


@pytest.fixture
def dataset(toy_dataset):
    return toy_dataset


def checksums(root):
    return {k: v["sha256"] for k, v in json.loads((root / "manifest.json").read_text())["shards"].items()}


def test_examples_hold_policy_experience_and_targets(dataset):
    data = ImprovementDataset(dataset)
    assert len(data) == 3 * 2
    item = data[0]
    assert item["observations"].shape == (2, 40, 4) and item["target_actions"].shape == (2, 40, 2)
    assert item["better_observations"].shape[0] == 2 and set(item["theta"]) >= {"net.0.weight"}
    record = json.loads(item["record"])
    assert record["recipe"]["epochs"] == 5
    example = data.example(0)
    lesser = example.lesser
    assert record["success"] == float(lesser.success.float().mean())  # the record's success is that of the stored episodes
    # the target is the expert's action on the states the lesser policy visited
    from improver.tasks import make_suite

    expert_actions = relabel(make_suite("toy:reach2d").expert, lesser)
    assert torch.allclose(expert_actions, item["target_actions"]) and torch.equal(example.target_actions, item["target_actions"])
    # and the stored parameters reproduce the lesser policy's actions
    with torch.no_grad():
        assert torch.allclose(example.policy(lesser.observations[:, 0]), lesser.actions[:, 0], atol=1e-5)
    assert example.record == record and example.better.num_episodes == 2


def test_streams_through_a_dataloader(dataset):
    batch = next(iter(DataLoader(ImprovementDataset(dataset), batch_size=3, shuffle=True, num_workers=2)))
    assert batch["observations"].shape == (3, 2, 40, 4) and len(batch["task"]) == 3


def test_ranked_episodes_for_the_reward_model(dataset):
    ranked, levels = ImprovementDataset(dataset).ranked()
    assert ranked.num_episodes == len(levels) == 3 * 3 * 2
    assert torch.allclose(levels.unique().double(), torch.tensor([0.02, 0.5, 1.0], dtype=torch.float64))


def test_same_seed_same_bytes_and_zoo_spread(dataset, tmp_path):
    generate(CONFIG, tmp_path, progress=False)
    assert checksums(tmp_path) == checksums(dataset)
    zoo = [z for e in read_manifest(dataset)["shards"].values() for z in e["zoo"]]
    assert max(z["mean_return"] for z in zoo) > min(z["mean_return"] for z in zoo)
    assert (dataset / "zoo.png").stat().st_size > 0


def test_corruption_and_other_settings_are_detected(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    shard = next((copy / "shards").glob("*.h5"))
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        ImprovementDataset(copy)
    with pytest.raises(ValueError, match="other settings"):
        generate(GenerateConfig("toy:reach2d", preset="tiny", seed=1), copy, progress=False)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        ImprovementDataset(tmp_path)


@pytest.mark.parametrize("tasks", [-1, 0])
def test_a_task_count_below_one_is_refused(tasks):
    with pytest.raises(ValueError, match=f"tasks must be at least 1.*got {tasks}"):
        GenerateConfig("toy:reach2d", preset="tiny", tasks=tasks)


def test_a_folder_holding_other_files_is_refused_untouched(tmp_path):
    (tmp_path / "shards" / ".cache").mkdir(parents=True)
    (tmp_path / "shards" / ".cache" / "index").write_text("mine")
    (tmp_path / "manifest.json").write_text("my manifest")
    (tmp_path / "zoo.png").write_text("my picture")
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    with pytest.raises(FileExistsError, match=r"holds no dataset \(no generate_config.json; it holds \['manifest.json', 'shards', 'zoo.png'\]"):
        generate(CONFIG, tmp_path, progress=False)
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_rerun_keeps_users_dot_folders_and_removes_only_its_temporaries(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (copy / "shards" / ".git").mkdir()
    (copy / "shards" / ".git" / "HEAD").write_text("mine")
    killed = copy / "shards" / ".train-0001.h5.x1y2z3_w"  # as a write killed part-way leaves it
    killed.mkdir()
    (killed / "partial.h5").write_bytes(b"half")
    manifest = generate(CONFIG, copy, progress=False)
    assert manifest["this_run"]["shards_made"] == 0 and checksums(copy) == checksums(dataset)
    assert (copy / "shards" / ".git" / "HEAD").read_text() == "mine" and not killed.exists()
    (copy / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="manifest.json is damaged"):
        generate(CONFIG, copy, progress=False)


def test_bad_shards_are_refused_on_read_and_made_again_on_rerun(dataset, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    first, second, third = sorted((copy / "shards").glob("*.h5"))
    # another task's shard copied over the third, with the manifest's checksum rewritten to match
    shutil.copyfile(first, third)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][third.name]["sha256"] = manifest["shards"][first.name]["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{third.name} records {{'index': 0}}, where {{'index': 2}} was expected"):
        ImprovementDataset(copy)
    # a truncated shard is refused by name, not with h5py's OSError
    second.write_bytes(second.read_bytes()[:2000])
    with pytest.raises(ValueError, match=f"shard .*{second.name} is unreadable"):
        read_manifest(copy, verify=False)
    raw = bytearray(first.read_bytes())
    raw[-100] ^= 0xFF
    first.write_bytes(bytes(raw))
    capsys.readouterr()
    rerun = generate(CONFIG, copy, progress=False)
    printed = capsys.readouterr().out
    assert f"making {first.name} again: shard {first} is corrupted" in printed
    assert f"making {second.name} again: shard {second} is unreadable" in printed
    assert f"making {third.name} again: shard {third} records" in printed
    assert rerun["this_run"]["shards_made"] == 3
    assert checksums(copy) == checksums(dataset)
    read_manifest(copy)


def test_sigkill_then_resume_gives_the_same_dataset(dataset, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "improver.cli", "generate", "--suite", "toy:reach2d", "--preset", "tiny", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "shards").glob("*.h5")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list((out / "shards").glob("*.h5")))
    assert 1 <= done < 3, "the kill should land part-way"
    assert not (out / "manifest.json").exists()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert checksums(out) == checksums(dataset)
    assert not list((out / "shards").glob(".*")), "temporaries of the killed run are gone"


def test_two_processes_give_the_same_examples(dataset, tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "improver.cli", "generate", "--suite", "toy:reach2d", "--preset", "tiny", "--out", str(tmp_path),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert checksums(tmp_path) == checksums(dataset)
    assert json.loads((tmp_path / "manifest.json").read_text())["this_run"]["processes"] == 2


def test_zoo_member_quality_follows_its_recipe(toy):
    good = train_member(toy, toy.tasks("train")[0], ZooRecipe(0.2, 4, 100, relabel=True), seed=0, eval_episodes=4)
    bad = train_member(toy, toy.tasks("train")[0], ZooRecipe(1.0, 1, 1), seed=0, eval_episodes=4)
    assert good.record["mean_return"] > bad.record["mean_return"]
    assert good.record["success"] >= 0.75


def test_fit_policy_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, obs_dim\]"):
        fit_policy(torch.nn.Linear(4, 2), torch.zeros(3, 4), torch.zeros(2, 2), epochs=1)
