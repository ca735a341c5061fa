import json
import subprocess
import sys
from dataclasses import fields, replace

import pytest
import torch

from improver.cli import BENCHMARKS, COMMANDS, Generate, Improve, MetaTrain, Network, RewardModel, bind_nested_configs, main
from improver.loop_settings import LoopOverrides, LoopSettings
from improver.policies import MLPPolicy, save_policy


def test_rollout_command_with_saved_policy_and_video(tmp_path, capsys):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        save_policy(MLPPolicy(4, 2), tmp_path / "policy")
    main(
        [
            "rollout", "--suite", "toy:reach2d", "--policy", str(tmp_path / "policy"), "--episodes", "4",
            "--video", str(tmp_path / "ep.gif"), "--json-out", str(tmp_path / "rows.json"),
        ]
    )
    out = capsys.readouterr().out
    assert "| family" in out and "reach2d" in out
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    # a fresh policy's small actions never bring the point within 5 cm of a held-out goal (the expert's: 1.0, below)
    assert rows[0]["episodes"] == 4 and rows[0]["success"] == 0.0
    assert (tmp_path / "ep.gif").stat().st_size > 0


def test_rollout_command_expert_on_toy(tmp_path, capsys):
    main(["rollout", "--suite", "toy:reach2d", "--episodes", "10", "--json-out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["success"] == 1.0


def test_bad_suite_on_the_command_line():
    with pytest.raises(ValueError, match="unknown suite"):
        main(["rollout", "--suite", "nope"])


@pytest.mark.slow
def test_bench_rollout_writes_figures(tmp_path):
    main(["bench", "rollout", "--out", str(tmp_path / "b.json"), "--episodes", "1", "--frames", "5"])
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["raw_env_steps_per_s"] > 0 and result["render_speedup"] > 1


@pytest.fixture
def carrying_improver(tmp_path):
    """A tiny improver saved with loop settings (behaviour mode, exploration 0.2)."""
    import torch

    from improver.loop_settings import LoopSettings
    from improver.network import NetworkConfig
    from improver.operator import Improver

    with torch.random.fork_rng():
        torch.manual_seed(0)
        improver = Improver(NetworkConfig(4, 2, width=16, task_dim=2), distill_steps=2, loop_settings=LoopSettings("behaviour", exploration=0.2))
    return improver.save_pretrained(tmp_path / "improver")


def test_improve_reads_the_task_from_the_policys_record_and_the_settings_from_the_improver(carrying_improver, tmp_path, capsys):
    record = {"suite": "toy:reach2d", "suite_seed": 0, "split": "test", "index": 1}
    save_policy(MLPPolicy(4, 2), tmp_path / "policy", record=record)
    args = ["improve", "--policy", str(tmp_path / "policy"), "--improver", str(carrying_improver), "--steps", "1", "--episodes", "2"]
    main(args)
    out = capsys.readouterr().out
    assert "on toy:reach2d [test] #1;" in out and "mode='behaviour', exploration=0.2" in out and "| step" in out
    main([*args, "--split", "train", "--mode", "parameters", "--exploration", "0"])  # flags override the record and the improver
    out = capsys.readouterr().out
    assert "on toy:reach2d [train], " in out and "mode='parameters', exploration=0" in out
    save_policy(MLPPolicy(4, 2), tmp_path / "anonymous")
    with pytest.raises(ValueError, match="its record names no suite; give --suite"):
        main(["improve", "--policy", str(tmp_path / "anonymous"), "--improver", str(carrying_improver)])


@pytest.mark.parametrize("choice, task_dim", [("learned", 2), ("none", 0)])
def test_meta_train_chooses_the_task_inference(toy_dataset, tmp_path, choice, task_dim):
    from improver.operator import Improver

    main(["meta-train", "--data", str(toy_dataset), "--out", str(tmp_path), "--steps", "1", "--batch-size", "2", "--width", "16",
          "--distill-weight", "0", "--task-inference", choice])
    improver = Improver.from_pretrained(tmp_path / "improver")
    assert improver.config.task_dim == task_dim and improver.fit_epochs == 20
    assert (improver.config.task_inference == "learned") == (choice == "learned")


def test_help_lists_every_command_and_benchmark_without_importing_the_commands_configs():
    # a fresh process: the modules that hold the nested configs (and torch with them) stay unimported
    code = (
        "import sys\nfrom improver.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print([m for m in ('improver.train', 'improver.refine', 'improver.meta_train', 'improver.task_inference') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for name in [*COMMANDS, *(f"bench {name}" for name in BENCHMARKS)]:
        assert f"\n  {name} " in result.stdout, name
    assert result.stdout.strip().endswith("[]")


def test_unknown_command_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "nope"])
    assert exit_info.value.code == 2
    assert "unknown command 'nope'; choose one of: rollout, improve, step" in capsys.readouterr().err


def test_loop_overrides_are_the_loop_settings_each_optional():
    assert [f.name for f in fields(LoopOverrides)] == [f.name for f in fields(LoopSettings)]
    assert all(value is None for value in vars(LoopOverrides()).values())
    carried = LoopSettings("behaviour", exploration=0.2, task_exploration=0.1)
    assert LoopOverrides().applied(carried) == carried
    assert LoopOverrides(mode="parameters", memory=2).applied(carried) == LoopSettings("parameters", exploration=0.2, memory=2)


def test_nested_configs_keep_the_flat_flags_and_the_commands_defaults():
    import tyro

    from improver.task_inference import DEFAULT_TASK_INFERENCE

    bind_nested_configs()
    improve = tyro.cli(Improve, args=["--policy", "p", "--improver", "i", "--steps", "5", "--task-exploration", "0.1", "--mode", "behaviour"])
    assert (improve.length.steps, improve.length.episodes, improve.loop) == (5, 10, LoopOverrides(mode="behaviour", task_exploration=0.1))
    meta = tyro.cli(MetaTrain, args=["--data", "d", "--out", "o", "--width", "16", "--steps", "7", "--task-inference", "learned"])
    assert (meta.network.width, meta.network.task_inference, meta.meta_training.steps) == (16, "learned", 7)
    assert meta.meta_training.distill_weight == 0.0  # the command's recipe, not MetaTrainConfig's default
    assert Network().task_inference == DEFAULT_TASK_INFERENCE  # written out in the command line's light module: keep them equal


def test_generate_and_reward_model_nest_their_configs():
    import tyro

    from improver.augment.generate import GenerateConfig
    from improver.augment.ranking_reward import RewardModelConfig

    bind_nested_configs()
    generate = tyro.cli(Generate, args=["--suite", "toy:reach2d", "--out", "o", "--preset", "tiny", "--tasks", "2", "--frames", "--size", "32"])
    assert generate.dataset == GenerateConfig("toy:reach2d", preset="tiny", frames=True, tasks=2, render=replace(GenerateConfig("x").render, size=32))
    reward = tyro.cli(RewardModel, args=["--data", "d", "--steps", "5", "--use-frames"])
    assert reward.model == RewardModelConfig(steps=5, use_frames=True)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        GenerateConfig("toy:reach2d", split="val")
