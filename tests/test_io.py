import json

import pytest
import torch

from improver.io import atomic_path
from improver.policies import MLPPolicy, load_policy, save_policy
from improver.tasks import RenderConfig, rollout
from improver.tasks.video import episode_frames, write_video


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_policy_round_trip(tmp_path):
    policy = MLPPolicy(4, 2, hidden=(8,))
    save_policy(policy, tmp_path / "p", record={"success": 0.25})
    loaded, record = load_policy(tmp_path / "p")
    obs = torch.randn(5, 4)
    assert torch.equal(policy(obs), loaded(obs))
    assert record == {"success": 0.25}


def test_incompatible_policy_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved policy"):
        load_policy(tmp_path)
    save_policy(MLPPolicy(4, 2), tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    config["kwargs"]["hidden"] = [3]
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit"):
        load_policy(tmp_path / "p")
    config["class"] = "Transformer"
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="incompatible"):
        load_policy(tmp_path / "p")
    with pytest.raises(TypeError, match="cannot save"):
        save_policy(torch.nn.Linear(2, 2), tmp_path / "q")


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_from_a_rendered_episode(toy, tmp_path, suffix):
    import imageio.v2 as imageio

    drift = lambda obs: torch.full((len(obs), 2), 0.2)  # noqa: E731  (every frame differs; GIF merges repeats)
    traj = rollout(drift, toy.tasks("test")[0], 1, render=RenderConfig(every=4, size=64), progress=False)
    frames = episode_frames(traj)
    path = write_video(tmp_path / f"episode{suffix}", frames)
    read = imageio.mimread(path)
    assert len(read) == len(frames) == 10
    assert read[0].shape[:2] == (64, 64)
    with pytest.raises(ValueError, match="must end in"):
        write_video(tmp_path / "episode.avi", frames)
