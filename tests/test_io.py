import json

import pytest
import torch

from improver import io
from improver.cli import main
from improver.io import FolderKind, atomic_path, leftover_temporaries
from improver.network import NetworkConfig
from improver.operator import Improver
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


KIND = FolderKind("test output", {"format_version"}, entries={"config.json", "data.txt"})


def write_output(path, text):
    with atomic_path(path, KIND) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps({"format_version": 1}))
        (tmp / "data.txt").write_text(text)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_a_folder_is_never_replaced_by_a_file(tmp_path):
    (tmp_path / "out.json" / ".git").mkdir(parents=True)
    (tmp_path / "out.json" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(IsADirectoryError, match="out.json is a folder; give a file path"):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "contents, found",
    [
        ({"notes.txt": "mine"}, r"holds \['notes.txt'\]"),
        ({"config.json": "{}", "data.txt": "mine"}, "has a config.json of another kind"),
        ({"config.json": "not json", "data.txt": "mine"}, "has an unreadable config.json"),
        ({"config.json": '{"format_version": 1}'}, r"lacks \['data.txt'\]"),
    ],
)
def test_a_folder_of_another_kind_is_refused_untouched(tmp_path, contents, found):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in contents.items():
        (out / name).write_text(text)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=f"out {found}, so it is not an earlier test output"):
        write_output(out, "new")
    assert snapshot(tmp_path) == before
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a folder"):
        write_output(tmp_path / "file", "new")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_an_earlier_output_of_the_same_kind_is_replaced(tmp_path, monkeypatch, exchange):
    calls = []
    real = io.exchange_folders

    def spy(a, b):
        calls.append(real(a, b) if exchange else False)
        return calls[-1]

    monkeypatch.setattr(io, "exchange_folders", spy)
    (tmp_path / "empty").mkdir()
    write_output(tmp_path / "empty", "first")  # an empty folder takes an output
    write_output(tmp_path / "out", "old")
    assert calls == []
    write_output(tmp_path / "out", "new")
    if exchange and calls == [False]:
        pytest.skip("this filesystem cannot exchange two folders atomically")
    assert calls == [exchange]
    assert (tmp_path / "out" / "data.txt").read_text() == "new" and (tmp_path / "empty" / "data.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"], "the old version and all temporaries are gone"


def test_only_the_package_temporaries_count_as_leftovers(tmp_path):
    ours = tmp_path / ".train-0000.h5.ab_c12de"
    ours.mkdir()
    (ours / "partial.h5").write_bytes(b"half")
    for name, inside in [(".git", "config"), (".train-0000.h5.keep", "partial.h5"), (".train-0001.h5.ab_c12de", "partial.h5"), (".train-0000.h5.zz_z12de", "mine.txt")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / inside).write_text("mine")
    assert leftover_temporaries(tmp_path, ["train-0000.h5"]) == [ours]


def test_save_policy_and_save_pretrained_never_replace_a_users_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"mine holds \['thesis.tex'\], so it is not an earlier saved policy"):
        save_policy(MLPPolicy(4, 2), tmp_path / "mine")
    model = Improver(NetworkConfig(4, 2, width=16, layers=1), distill_steps=1)
    with pytest.raises(FileExistsError, match="not an earlier improver checkpoint"):
        model.save_pretrained(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    # an earlier output of the same kind is replaced, one of another kind is not
    save_policy(MLPPolicy(4, 2, hidden=(8,)), tmp_path / "policy")
    save_policy(MLPPolicy(4, 2, hidden=(3,)), tmp_path / "policy", record={"round": 2})
    assert load_policy(tmp_path / "policy")[1] == {"round": 2}
    with pytest.raises(FileExistsError, match="config.json of another kind"):
        model.save_pretrained(tmp_path / "policy")
    model.save_pretrained(tmp_path / "improver")
    model.save_pretrained(tmp_path / "improver")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["improver", "mine", "policy"]


def test_rollout_json_out_onto_a_folder_is_refused(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run1.json").write_text("keep")
    with pytest.raises(IsADirectoryError, match="results is a folder; give a file path"):
        main(["rollout", "--suite", "toy:reach2d", "--episodes", "2", "--json-out", str(tmp_path / "results")])
    assert (tmp_path / "results" / "run1.json").read_text() == "keep"


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
