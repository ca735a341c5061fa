import json

import pytest

from improver.cli import main
from improver.policies import MLPPolicy, save_policy


def test_rollout_command_with_saved_policy_and_video(tmp_path, capsys):
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
    assert rows[0]["episodes"] == 4 and 0.0 <= rows[0]["success"] <= 1.0
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
