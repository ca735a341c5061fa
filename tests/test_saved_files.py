"""Damaged, foreign or hand-edited checkpoints raise a ValueError naming the file; bad CLI input is refused clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from improver.augment.ranking_reward import RewardEnsemble, RewardModelConfig, load_reward_model, save_reward_model
from improver.cli import main
from improver.network import NetworkConfig
from improver.operator import Improver
from improver.policies import MLPPolicy, load_policy, save_policy


@pytest.fixture
def checkpoint(tmp_path):
    return Improver(NetworkConfig(obs_dim=4, act_dim=2, width=16, layers=1, task_dim=2)).save_pretrained(tmp_path / "improver")


def _damage(path, how):
    data = path.read_bytes()
    damaged = {
        "empty": b"",
        "truncated": data[: len(data) - 7],
        "header-truncated": data[:20],
        "huge-header": struct.pack("<Q", 2**62) + data[8:],
    }[how]
    path.write_bytes(damaged)


@pytest.mark.parametrize("how", ["empty", "truncated", "header-truncated", "huge-header"])
def test_damaged_weights_name_the_file(checkpoint, how):
    _damage(checkpoint / "model.safetensors", how)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        Improver.from_pretrained(checkpoint)


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("network"), r"lacks \['network'\]"),
        (lambda c: c.update(surprise=1), r"unknown keys \['surprise'\]"),
        (lambda c: c["network"].update(width=-16), "must be positive"),
        (lambda c: c["network"].update(obs_dim="4"), "must be an integer"),
        (lambda c: c["network"].update(depth=3), "unexpected keyword"),
        (lambda c: c.update(distill_steps=-1), "distill_steps"),
        (lambda c: c.update(aim_offset=[0.0]), "aim_offset"),
    ],
)
def test_edited_config_is_refused(checkpoint, edit, message):
    _edit_config(checkpoint, edit)
    with pytest.raises(ValueError, match=message):
        Improver.from_pretrained(checkpoint)


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ("[1, 2]", "must hold a JSON object"), ("\udcff", "not valid JSON")])
def test_config_that_is_not_a_json_object(checkpoint, text, message):
    (checkpoint / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=message):
        Improver.from_pretrained(checkpoint)


def test_weights_of_another_network_are_refused(checkpoint, tmp_path):
    Improver(NetworkConfig(obs_dim=4, act_dim=2, width=32, layers=1, task_dim=2)).save_pretrained(tmp_path / "wider")
    (checkpoint / "model.safetensors").write_bytes((tmp_path / "wider" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not fit the architecture"):
        Improver.from_pretrained(checkpoint)


def test_network_config_refuses_bad_sizes():
    with pytest.raises(ValueError, match="multiple of heads"):
        NetworkConfig(obs_dim=4, act_dim=2, width=10, heads=4)
    with pytest.raises(ValueError, match="must be positive"):
        NetworkConfig(obs_dim=4, act_dim=0)


@pytest.fixture
def saved_policy(tmp_path):
    return save_policy(MLPPolicy(4, 2, (8,)), tmp_path / "policy", record={"task": 0})


@pytest.mark.parametrize(
    "text, message",
    [
        ("{broken", "not valid JSON"),
        ('"a string"', "must hold a JSON object"),
        ('{"format_version": 1, "class": "MLPPolicy", "kwargs": {"obs_dim": 4, "act_dim": 2, "hidden": [8]}}', r"lacks \['record'\]"),
        ('{"format_version": 1, "class": "MLPPolicy", "kwargs": {"obs_dim": 4, "act_dim": 2, "hidden": [8]}, "record": 3}', "must be JSON objects"),
        ('{"format_version": 1, "class": "MLPPolicy", "kwargs": {"obs_dim": -4, "act_dim": 2}, "record": {}}', "do not build a MLPPolicy"),
        ('{"format_version": 1, "class": "MLPPolicy", "kwargs": {"obs_dim": 4, "act_dim": 2, "hidden": [9]}, "record": {}}', "do not fit"),
    ],
)
def test_load_policy_refuses_a_bad_record(saved_policy, text, message):
    (saved_policy / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_policy(saved_policy)


def test_load_policy_refuses_truncated_weights(saved_policy):
    _damage(saved_policy / "model.safetensors", "truncated")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_policy(saved_policy)


def test_reward_model_damaged_files(tmp_path):
    path = save_reward_model(RewardEnsemble(4, RewardModelConfig(members=1, hidden=(8,))), tmp_path / "reward")
    _damage(path / "model.safetensors", "truncated")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_reward_model(path)
    (path / "config.json").write_text('{"format_version": 1, "obs_dim": 4}')
    with pytest.raises(ValueError, match=r"lacks \['config'\]"):
        load_reward_model(path)


def test_improve_refuses_a_task_index_out_of_range(saved_policy, checkpoint):
    with pytest.raises(ValueError, match="--task-index 99 is out of range"):
        main(["improve", "--policy", str(saved_policy), "--improver", str(checkpoint), "--suite", "toy:reach2d", "--task-index", "99"])


def test_improve_refuses_out_in_behaviour_mode(saved_policy, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--out saves the improved policy's own parameters"):
        main(["improve", "--policy", str(saved_policy), "--improver", str(checkpoint), "--mode", "behaviour", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_nothing_is_unpickled(checkpoint, tmp_path, monkeypatch):
    """The loaders read safetensors and JSON only: torch.load is never called."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    Improver.from_pretrained(checkpoint)
    load_policy(save_policy(MLPPolicy(4, 2), tmp_path / "p"))
