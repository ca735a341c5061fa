import json

import pytest
import torch

from improver.augment.dataset import ImprovementDataset
from improver.augment.generate import GenerateConfig, generate
from improver.demo import export_lesser, run_demo
from improver.policies import load_policy
from improver.network import NetworkConfig
from improver.operator import Improver


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretrained folder: an (untrained) improver and lesser policies from held-out toy tasks."""
    root = tmp_path_factory.mktemp("pretrained")
    generate(GenerateConfig("toy:reach2d", split="test", preset="tiny"), root / "heldout", progress=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Improver(NetworkConfig(4, 2, width=16, task_dim=2), distill_steps=2).save_pretrained(root / "improver")
    export_lesser(ImprovementDataset(root / "heldout"), root / "lesser", max_success=1.0, limit=2)
    return root


def test_demo_writes_table_plot_and_videos(pretrained, tmp_path, capsys):
    summary = run_demo(pretrained, tmp_path, steps=2, episodes=3, mode="behaviour", seed=0, task_exploration=0.05, wide_task_exploration=0.1)
    printed = capsys.readouterr().out
    assert "| step | success" in printed and "2 lesser policies on held-out tasks" in printed
    table = summary["table"]
    assert [row["step"] for row in table] == [0, 1, 2]
    # 2 policies x 3 toy episodes of 40 steps per step, counted cumulatively.
    assert [row["env_steps"] for row in table] == [240, 480, 720]
    # each step's row pools the policies' own rows (equal episodes each: their mean)
    per_policy = [run["rows"] for run in summary["policies"]]
    assert len(per_policy) == 2
    assert [row["success"] for row in table] == pytest.approx([sum(rows[k]["success"] for rows in per_policy) / 2 for k in range(3)])
    for name in ("success_vs_step.png", "before.mp4", "after.mp4"):
        assert (tmp_path / name).stat().st_size > 1000
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["table"] == table and (written["task_exploration"], written["wide_task_exploration"]) == (0.05, 0.1)


def test_export_keeps_only_lesser_policies(pretrained, tmp_path):
    data = ImprovementDataset(pretrained / "heldout")
    successes = [data.example(i).record["success"] for i in range(len(data))]
    cap = sorted(successes)[len(successes) // 2]
    saved = export_lesser(data, tmp_path, max_success=cap)
    assert len(saved) == sum(s <= cap for s in successes)
    with pytest.raises(ValueError, match="no lesser policy"):
        export_lesser(data, tmp_path / "none", max_success=-1.0)
    one_each = export_lesser(data, tmp_path / "one_each", max_success=1.0, per_task=1)
    tasks = [load_policy(p)[1]["index"] for p in one_each]
    assert sorted(tasks) == sorted({data.example(i).lesser.tasks[0].index for i in range(len(data))})


def test_demo_without_policies_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lesser policies"):
        run_demo(tmp_path, tmp_path / "out", steps=1, episodes=1, mode="behaviour", seed=0)


@pytest.mark.parametrize("family, policies", [("reach-v3", 9), ("push-v3", 10), ("pick-place-v3", 10)])
def test_shipped_improver_and_its_lesser_policies_load(family, policies):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "pretrained" / family
    improver = Improver.from_pretrained(root / "improver")
    assert (improver.config.obs_dim, improver.config.act_dim, improver.config.task_dim) == (39, 4, 3)
    records = [load_policy(folder)[1] for folder in sorted((root / "lesser").iterdir())]
    assert len(records) == policies
    assert all(r["suite"] == f"ML1:{family}" and r["split"] == "test" and r["zoo"]["success"] <= 0.3 for r in records)


def test_demo_runs_with_the_improvers_loop_settings_unless_told_otherwise(pretrained, tmp_path):
    import shutil

    from improver.loop_settings import LoopSettings

    folder = tmp_path / "pretrained"
    shutil.copytree(pretrained / "lesser", folder / "lesser")
    shipped = Improver.from_pretrained(pretrained / "improver")
    carrying = Improver(shipped.config, distill_steps=2, loop_settings=LoopSettings("behaviour", exploration=0.2, task_exploration=0.05))
    carrying.load_state_dict(shipped.state_dict())
    carrying.save_pretrained(folder / "improver")
    summary = run_demo(folder, tmp_path / "out", steps=1, episodes=2, video=False)
    assert (summary["mode"], summary["exploration"], summary["task_exploration"], summary["memory"]) == ("behaviour", 0.2, 0.05, 1)
    summary = run_demo(folder, tmp_path / "out", steps=1, episodes=2, mode="parameters", video=False)
    assert (summary["mode"], summary["exploration"], summary["task_exploration"]) == ("parameters", 0.2, 0.0)


def test_starting_policies_command_saves_the_heldout_lesser_policies(pretrained, tmp_path, capsys):
    from improver.cli import main

    main(["starting-policies", "--data", str(pretrained / "heldout"), "--out", str(tmp_path / "starts"), "--max-success", "1.0", "--limit", "2"])
    assert "wrote 2 starting policies" in capsys.readouterr().out
    _, record = load_policy(tmp_path / "starts" / "01")
    assert (record["suite"], record["split"]) == ("toy:reach2d", "test") and "index" in record
    with pytest.raises(ValueError, match="no lesser policy in the dataset has success <= -1"):
        main(["starting-policies", "--data", str(pretrained / "heldout"), "--out", str(tmp_path / "none"), "--max-success", "-1"])
