"""`improver train`: the whole recipe on the toy suite, its resume and its refusals."""

import json
import os

import pytest

from improver.loop_settings import LoopSettings
from improver.operator import Improver
from improver.train import TrainConfig, candidate_settings, train, verdict

TINY = TrainConfig(
    "toy:reach2d", train_tasks=3, heldout_tasks=2, steps=6, preset="tiny", width=16, refine_steps=5, head_steps=5,
    choose_policies=2, report_seeds=2, loop_steps=2, episodes=2,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    improver = train(TINY, out, progress=False)
    return out, improver


def test_train_writes_improver_report_and_chooses_on_training_tasks(trained):
    out, improver = trained
    report = json.loads((out / "report.json").read_text())
    # every way of task inference with every candidate settings ran (the toy suite infers its goal: all three candidates)
    assert set(report["choice"]) == {f"{way}/{name}" for way in TINY.task_inference for name in candidate_settings(1.0)}
    assert report["chosen"] in report["choice"]
    assert (out / report["chosen"].split("/")[0] / "meta-train" / "improver" / "config.json").is_file()
    assert report["expert_check"]["reach2d"]["expert"]["success"] == 1.0  # the toy expert heads straight for its goal
    # the saved improver carries what was chosen: loading it gives those settings back
    saved = Improver.from_pretrained(out / "improver")
    assert saved.loop_settings == LoopSettings(**report["loop_settings"]) == improver.loop_settings
    # the choice ran on training tasks only; the report's held-out units are the held-out starting policies x seeds
    assert all(json.loads(p.read_text())["task"] is not None for p in (out / "choose").rglob("*.json"))
    starts = sorted(p.name for p in (out / "starting" / "heldout").iterdir())
    assert report["heldout"]["units"] == len(starts) * TINY.report_seeds
    for part in ("train", "heldout"):
        rows = report[part]["rows"]
        assert [r["step"] for r in rows] == list(range(TINY.loop_steps + 1))
        units = report[part]["per_unit"]  # each step's success is the mean over the units' own
        assert [r["success"] for r in rows] == pytest.approx([sum(u["success"][k] for u in units) / len(units) for k in range(len(rows))])
    assert report["verdict"] == verdict(report) and report["verdict"] in ("worked", "failed")
    text = (out / "report.md").read_text()
    assert ("WORKED" in text) == (report["verdict"] == "worked") and "held-out tasks" in text
    assert (out / "report.png").stat().st_size > 1000


def test_rerun_resumes_without_redoing_units(trained):
    out, _ = trained
    units = sorted((out / "report").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in units}
    train(TINY, out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "report").rglob("*.json"))} == stamps


def test_refuses_other_settings_and_foreign_folders(trained, tmp_path):
    out, _ = trained
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ValueError, match="other settings \\(steps\\)"):
        train(TrainConfig(**{**TINY.__dict__, "steps": 7}), out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no training run"):
        train(TINY, tmp_path, progress=False)
    assert os.listdir(tmp_path) == ["thesis.tex"]


@pytest.mark.parametrize("field, value", [("task_inference", ()), ("task_inference", ("learned", "learned")), ("train_tasks", 0), ("steps", -1), ("lr", 0.0), ("max_start_success", 1.0), ("head_steps", -2)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{**TINY.__dict__, field: value})


def test_candidates_scale_with_the_tasks_and_skip_task_exploration_without_inference():
    assert "behaviour+task-exploration" not in candidate_settings(None)
    wide = candidate_settings(0.5)["behaviour+task-exploration"]
    assert (wide.task_exploration, wide.wide_task_exploration) == (0.5, 1.0)
