"""Every example in examples/ runs, with tiny settings (in this process where it can, to share imports)."""

import json
import os
import runpy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from improver.network import NetworkConfig
from improver.operator import Improver

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name, argv, monkeypatch):
    """Run examples/<name> as a script with ``argv``; returns its globals."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def load_example(name, monkeypatch):
    """Import examples/<name> without running its main."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


@pytest.fixture(scope="module")
def toy_improver(tmp_path_factory):
    """An untrained improver for the toy suite: the examples' plumbing, not their results, is under test."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Improver(NetworkConfig(4, 2, width=32), distill_steps=5).save_pretrained(tmp_path_factory.mktemp("imp") / "improver")


def test_quickstart_improves_a_policy_class_only_the_example_defines(monkeypatch, capsys):
    example = load_example("quickstart.py", monkeypatch)
    policy, rows = example["main"](example["Args"](steps=1, episodes=1))
    assert type(policy).__name__ == "MyPolicy" and type(policy).__module__ != "improver"
    torch.manual_seed(0)
    start = example["MyPolicy"]()  # main seeds 0 before building its policy: this is its start
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), policy.state_dict().values()))
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["env_steps"] == 1000
    assert "| step | success |" in capsys.readouterr().out


def test_cleanrl_script_replaces_the_ppo_update(monkeypatch, toy_improver, tmp_path, capsys):
    example = load_example("cleanrl_improver.py", monkeypatch)
    args = example["Args"](env_id="toy:reach2d", improver=toy_improver, num_iterations=2, num_episodes=2, log_dir=tmp_path)
    successes = example["main"](args)
    assert len(successes) == 3 and all(2 * s in (0.0, 1.0, 2.0) for s in successes)  # success rates of 2 episodes
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent)).Reload()
    assert [e.value for e in events.Scalars("charts/success_rate")] == pytest.approx(successes)
    assert capsys.readouterr().out.count("global_step=") == 3


def test_sb3_dropin(monkeypatch, toy_improver, tmp_path, capsys):
    example = load_example("sb3_dropin.py", monkeypatch)
    args = example["Args"](
        suite="toy:reach2d", improver=toy_improver, timesteps=160, n_steps=40, every=2, episodes=2, eval_episodes=2, compare=True,
        checks=(80,), out=tmp_path,
    )
    result = example["main"](args)
    improved = result["ppo+improver"]
    assert len(improved["improvement"]) == 1  # 4 rollouts, every 2: one step, before the third
    assert [p["ppo_timesteps"] for p in improved["curve"]] == [0, 80, 160]
    assert [p["env_steps"] for p in improved["curve"]] == [0, 80, 160 + 2 * 40]  # the improver's episodes are counted
    assert [p["env_steps"] for p in result["ppo"]["curve"]] == [0, 80, 240]  # plain PPO: the same budget
    assert (tmp_path / "model.zip").is_file() and json.loads((tmp_path / "curves.json").read_text()) == result
    assert "ppo+improver: " in capsys.readouterr().out
    watching = example["main"](replace(args, watch_rollouts=True, compare=False))["ppo+improver"]
    assert len(watching["improvement"]) == 1 and watching["curve"][-1]["env_steps"] == 160  # no episodes of its own


def test_sb3_dropin_distils_the_improved_behaviour_then_ppo_learns_on(monkeypatch, toy_improver, tmp_path):
    from improver.policies import MLPPolicy, save_policy

    example = load_example("sb3_dropin.py", monkeypatch)
    record = {"suite": "toy:reach2d", "suite_seed": 0, "split": "test", "index": 3}
    save_policy(MLPPolicy(4, 2), tmp_path / "start", record=record)
    args = example["Args"](
        start=tmp_path / "start", improver=toy_improver, behaviour=True, steps=1, dagger_rounds=1, timesteps=80, n_steps=40,
        episodes=2, eval_episodes=2, out=tmp_path / "out",
    )
    result = example["main"](args)["ppo+improver"]
    assert [r.get("step", r.get("round")) for r in result["improvement"]] == [0, 1, 1]  # loop steps 0-1, then one DAgger round
    assert [p["env_steps"] for p in result["curve"]] == [0, 240, 320] and result["curve"][-1]["ppo_timesteps"] == 80


# Meta-World data generation and 500-step episodes: 25 s on 2 busy cores, so it runs by default like every example.
def test_meta_train_on_an_ml1_family_then_improve_held_out(monkeypatch, tmp_path, capsys):
    run_example(
        "meta_train_and_improve.py",
        ["--suite", "ML1:reach-v3", "--out", str(tmp_path), "--preset", "tiny", "--train-tasks", "1", "--heldout-tasks", "1",
         "--meta-steps", "2", "--steps", "1", "--episodes", "1", "--max-success", "1.0"],
        monkeypatch,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "improver" / "model.safetensors").is_file()
    assert "held-out policies of ML1:reach-v3" in out and "held-out success" in out


def test_own_env_meta_trains_and_improves_a_user_suite(monkeypatch, tmp_path, capsys):
    run_example(
        "own_env.py",
        ["--out", str(tmp_path), "--preset", "tiny", "--train-tasks", "2", "--heldout-tasks", "1", "--meta-steps", "3",
         "--steps", "1", "--episodes", "2", "--max-success", "1.0"],
        monkeypatch,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "held-out policies of reacher" in out and "held-out success" in out

    manifest = json.loads((tmp_path / "heldout" / "manifest.json").read_text())
    assert manifest["config"]["suite"] == "reacher" and manifest["config"]["split"] == "test"


def test_multiprocess_meta_training_with_accelerate_launch(toy_dataset, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [str(EXAMPLES / "multiprocess_meta_train.sh"), str(toy_dataset), str(tmp_path / "run"), "--steps", "1", "--token-stride", "1"],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "latest"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["improver.safetensors", "optimizer.safetensors", "progress.json"]
    assert json.loads((tmp_path / "run" / "improver" / "config.json").read_text())["metadata"]["processes"] == 2
    assert Improver.from_pretrained(tmp_path / "run" / "improver").config.obs_dim == 4
