"""`improver bench improve`: the protocol, the statistics and the tiny preset end to end (toy suite)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from improver.baselines import Checkpoint
from improver.bench import (
    CONTENDERS,
    BenchConfig,
    aggregate,
    compare,
    finished_units,
    gap_closed,
    load_starts,
    mean_ci,
    ppo_to_match,
    ratio,
    run_benchmark,
    score,
)
from improver.loop_settings import LoopSettings
from improver.network import NetworkConfig
from improver.operator import Improver
from improver.policies import MLPPolicy, save_policy

pytest.importorskip("stable_baselines3")


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory):
    """A tiny (untrained) toy improver and two starting policies, each on its own held-out goal."""
    root = tmp_path_factory.mktemp("toy-bench")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Improver(NetworkConfig(4, 2, width=32, token_stride=1), distill_steps=5).save_pretrained(root / "improver")
        for i in range(2):
            save_policy(MLPPolicy(4, 2), root / "lesser" / f"{i:02d}", record={"suite": "toy:reach2d", "suite_seed": 0, "split": "test", "index": i})
    return root


def test_statistics():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(half, 4.302652729911275 * 1.0 / math.sqrt(3))  # t(0.975, 2) * sd / sqrt(n)
    assert mean_ci([0.5]) == (0.5, None)
    assert gap_closed(15.0, 10.0, 20.0) == 0.5 and gap_closed(5.0, 10.0, 10.0) is None
    assert ratio(0.5, 0.25) == 2.0 and ratio(0.5, 0.0) is None and ratio(None, 1.0) is None


def _unit(returns: dict[str, list[float]], successes: dict[str, list[float]], expert: float) -> dict:
    runs = {
        name: [{"step": k, "env_steps": 100 * k, "success": s, "mean_return": r, "wall_s": 1.0} for k, (r, s) in enumerate(zip(rs, successes[name]))]
        for name, rs in returns.items()
    }
    return {"expert_return": expert, "runs": runs}


def test_aggregate_compare_and_ppo_to_match():
    units = [
        _unit({"improver-behaviour": [0, 5], "ppo": [0, 1, 2, 6]}, {"improver-behaviour": [0, 0.5], "ppo": [0, 0.0, 0.25, 0.5]}, 10.0),
        _unit({"improver-behaviour": [2, 8], "ppo": [2, 3, 4, 9]}, {"improver-behaviour": [0, 0.5], "ppo": [0, 0.25, 0.25, 0.75]}, 12.0),
    ]
    table = aggregate(units, ["improver-behaviour", "ppo", "bc"])
    assert set(table) == {"improver-behaviour", "ppo"}  # no unit ran bc
    final = table["improver-behaviour"][1]
    assert final["success"] == 0.5 and final["mean_return"] == 6.5 and final["success_ci95"] == 0.0
    assert math.isclose(final["gap_closed"], (0.5 + 0.6) / 2)  # (5-0)/(10-0), (8-2)/(12-2)
    assert math.isclose(final["gap_closed_pooled"], (6.5 - 1) / (11 - 1))
    [row] = compare(table, steps=1)
    assert row["vs"] == "ppo" and row["success_ratio"] == 0.5 / 0.125
    matched = {r["metric"]: r["ppo_env_steps_to_match"] for r in ppo_to_match(table, steps=1)}
    assert matched == {"success": 300, "mean_return": 300}  # PPO's mean success 0.25 at 200 steps, 0.625 at 300


def test_bad_input_is_refused(toy_bench, tmp_path, toy):
    with pytest.raises(ValueError, match="unknown suite"):
        run_benchmark(BenchConfig(suite="nope", improver=toy_bench / "improver", policies=toy_bench / "lesser", preset="tiny"), tmp_path)
    with pytest.raises(ValueError, match="unknown preset"):
        BenchConfig(preset="huge").resolved()
    with pytest.raises(FileNotFoundError, match="improver checkpoint"):
        run_benchmark(BenchConfig(suite="toy:reach2d", improver=tmp_path / "missing", policies=toy_bench / "lesser", preset="tiny"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no saved policies"):
        load_starts(tmp_path, toy)
    save_policy(MLPPolicy(39, 4), tmp_path / "big" / "00")
    with pytest.raises(ValueError, match="maps 39 observations"):
        load_starts(tmp_path / "big", toy)
    save_policy(MLPPolicy(4, 2), tmp_path / "train" / "00", record={"suite": "toy:reach2d", "split": "train", "index": 0})
    with pytest.raises(ValueError, match="held-out"):
        load_starts(tmp_path / "train", toy)


def test_tiny_preset_end_to_end(toy_bench, toy_dataset, tmp_path):
    from improver.cli import main

    out = tmp_path / "bench"
    main(["bench", "improve", "--preset", "tiny", "--suite", "toy:reach2d", "--improver", str(toy_bench / "improver"),
          "--policies", str(toy_bench / "lesser"), "--data", str(toy_dataset), "--out", str(out)])
    for name in ("results.json", "results.md", "success_vs_step.png", "success_vs_env_steps.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"improver-behaviour", "improver-parameters", "ppo", "maml", "bc"}
    assert results["reward_function_versions"] == ["toy"] and results["versions"]["stable-baselines3"] != "not installed"
    assert results["reports"]["maml"]["second_order"] and results["seeds"] == [0]
    budget = results["budget_per_step"]
    assert budget == 2 * 40  # tiny preset: 2 episodes of the toy's 40 steps per step
    for unit in results["per_unit"]:
        runs = unit["runs"]
        # Same starting policy, same evaluation episodes: every contender's step 0 is the same.
        assert len({(r[0]["success"], r[0]["mean_return"]) for r in runs.values()}) == 1
        # Equal env-step budget per improvement step.
        for k in range(3):
            assert {r[k]["env_steps"] for r in runs.values()} == {k * budget}
        # PPO's longer run (2x the improver's whole budget, i.e. 4 steps' worth) is scored too.
        assert [r["step"] for r in runs["ppo"]] == [0, 1, 2, 4] and runs["ppo"][-1]["env_steps"] == 4 * budget
        # The learners moved away from the starting policy.
        assert runs["bc"][2]["mean_return"] != runs["bc"][0]["mean_return"]
    assert len(results["comparison"]) == 2 * 3 * 2  # 2 improver modes x 3 contenders x 2 steps
    assert "## ppo" in (out / "results.md").read_text()


@dataclass
class Unchanged:
    """A contender that never changes the policy and notes the units it ran (task, seed): plugged in by one registry entry."""

    ran: list
    name = "unchanged"
    note = "unchanged: the starting policy, scored at every step."
    report = None

    def rows(self, policy, tasks, budget, steps, episodes, seed):
        self.ran.append((tasks[0].index, seed))
        return score([Checkpoint(policy, 0, 0.0)] * (steps + 1), tasks, episodes, seed)


def test_a_run_resumes_and_adds_policies_and_seeds(toy_bench, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setitem(CONTENDERS, "unchanged", lambda setup: Unchanged(ran))
    config = dict(suite="toy:reach2d", improver=toy_bench / "improver", policies=toy_bench / "lesser", preset="tiny", contenders=("improver-behaviour", "unchanged"))
    one = run_benchmark(BenchConfig(**config, seeds=1, max_policies=1), tmp_path)
    assert ran == [(0, 0)] and one["complete"] and one["policies"] == ["00"]
    # the plugged-in contender is scored, compared and described like the built-in ones
    assert list(one["table"]) == ["improver-behaviour", "unchanged"] and Unchanged.note in one["notes"]
    assert {r["vs"] for r in one["comparison"]} == {"unchanged"}
    first = run_benchmark(BenchConfig(**config, seeds=1), tmp_path)  # both policies: only the second one runs
    assert ran == [(0, 0), (1, 0)] and first["complete"] and first["per_unit"][0] == one["per_unit"][0]
    again = run_benchmark(BenchConfig(**config, seeds=1), tmp_path)
    assert ran == [(0, 0), (1, 0)] and again["per_unit"] == first["per_unit"]  # nothing rerun
    with pytest.raises(ValueError, match="does not ask for"):  # a smaller run would drop finished units from disk
        run_benchmark(BenchConfig(**config, seeds=1, max_policies=1), tmp_path)
    more = run_benchmark(BenchConfig(**config, seeds=2), tmp_path)
    assert ran[2:] == [(0, 1000), (1, 1000)]
    assert more["per_unit"][:2] == first["per_unit"] and more["seeds"] == [0, 1000] and more["units"] == 4
    assert more["wall_time_s"] > first["wall_time_s"]
    with pytest.raises(ValueError, match="other settings \\(steps\\)"):
        run_benchmark(BenchConfig(**config, seeds=2, steps=3), tmp_path)
    with pytest.raises(ValueError, match="unknown contenders \\['nope'\\]"):
        BenchConfig(contenders=("ppo", "nope")).resolved()


def test_results_of_the_benchmark_module_before_the_package_resume(tmp_path):
    """A results.json written by improver/benchmark.py (docs/bench/push-v3: older key names, no memory) resumes."""
    old = {
        "suite": "ML1:push-v3", "improver": "pretrained/push-v3/improver", "policies": "pretrained/push-v3/lesser", "data": "runs/push-v3/train",
        "preset": "small", "steps": 3, "episodes": 10, "seeds": 1, "ppo_multipliers": [1], "max_policies": 4,
        "contenders": ["improver-behaviour", "improver-parameters", "ppo", "maml", "bc"], "noise": 0.3, "goal_exploration": 0.04,
        "wide_goal_exploration": 0.08, "maml": {"examples": 16, "episodes": 4, "iterations": 100, "inner_steps": 5, "outer_lr": 0.03, "first_order": False},
        "maml_update": None, "suite_seed": 0, "ppo_kwargs": {},
    }
    row = {"step": 0, "env_steps": 0, "success": 0.0, "mean_return": 1.0, "wall_s": 0.0}
    unit = {"policy": "00", "tasks": [0], "seed": 0, "expert_return": 5.0, "runs": {"bc": [row]}}
    (tmp_path / "results.json").write_text(json.dumps({"complete": False, "config": old, "maml": None, "per_unit": [unit], "wall_time_s": 12.0}))
    config = BenchConfig(
        suite="ML1:push-v3", improver=Path("pretrained/push-v3/improver"), policies=Path("pretrained/push-v3/lesser"), data=Path("runs/push-v3/train"),
        ppo_multipliers=(1,), max_policies=4, seeds=3,
    ).resolved().with_loop_settings(LoopSettings("behaviour", 0.3, 0.04, 0.08, 1))  # the shipped push-v3 improver's
    assert finished_units(tmp_path, config, {("00", s) for s in (0, 1000, 2000)}) == ([unit], 12.0)
    with pytest.raises(ValueError, match="other settings \\(memory\\)"):
        finished_units(tmp_path, replace(config, memory=2), {("00", 0)})


def test_wide_task_exploration_reaches_the_improver_loop(tmp_path):
    """The bench's behaviour loop aims with the wide noise after a step whose episodes all failed."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Improver(NetworkConfig(4, 2, width=32, token_stride=1, task_dim=2), distill_steps=5).save_pretrained(tmp_path / "improver")
        save_policy(MLPPolicy(4, 2), tmp_path / "lesser" / "00", record={"suite": "toy:reach2d", "suite_seed": 0, "split": "test", "index": 0})

    def behaviour_runs(name, **goal):
        config = BenchConfig(suite="toy:reach2d", improver=tmp_path / "improver", policies=tmp_path / "lesser", preset="tiny",
                             steps=2, contenders=("improver-behaviour",), **goal)
        results = run_benchmark(config, tmp_path / name)
        return results["config"], results["per_unit"][0]["runs"]["improver-behaviour"]

    config, adaptive = behaviour_runs("adaptive", task_exploration=0.1, wide_task_exploration=0.5)
    _, wide = behaviour_runs("wide", task_exploration=0.5)
    _, narrow = behaviour_runs("narrow", task_exploration=0.1)
    assert (config["task_exploration"], config["wide_task_exploration"]) == (0.1, 0.5)
    assert adaptive[0]["success"] == 0  # the untrained start fails: step 2's policy watched episodes aimed with the wide noise
    key = [(r["success"], r["mean_return"]) for r in adaptive]
    assert key == [(r["success"], r["mean_return"]) for r in wide] and key != [(r["success"], r["mean_return"]) for r in narrow]


def test_a_record_from_before_a_setting_existed_resumes(toy_bench, tmp_path):
    """A setting missing from an older results.json had its default then: the run resumes, another value is refused."""
    config = dict(suite="toy:reach2d", improver=toy_bench / "improver", policies=toy_bench / "lesser", preset="tiny", contenders=("improver-behaviour",))
    run_benchmark(BenchConfig(**config), tmp_path)
    path = tmp_path / "results.json"
    record = json.loads(path.read_text())
    del record["config"]["wide_task_exploration"]
    record["per_unit"][0]["marker"] = "kept from the earlier run"
    path.write_text(json.dumps(record))
    assert run_benchmark(BenchConfig(**config), tmp_path)["per_unit"][0]["marker"] == "kept from the earlier run"
    with pytest.raises(ValueError, match="wide_task_exploration"):
        run_benchmark(BenchConfig(**config, wide_task_exploration=0.5), tmp_path)


def test_the_improver_contenders_run_with_the_improvers_loop_settings(tmp_path):
    """Goal exploration and memory left unset are the improver's; the results record the ones used, and resume on them."""
    from improver.loop_settings import LoopSettings

    with torch.random.fork_rng():
        torch.manual_seed(0)
        settings = LoopSettings("behaviour", exploration=0.3, task_exploration=0.1, wide_task_exploration=0.5)
        Improver(NetworkConfig(4, 2, width=32, token_stride=1, task_dim=2), distill_steps=5, loop_settings=settings).save_pretrained(tmp_path / "improver")
        save_policy(MLPPolicy(4, 2), tmp_path / "lesser" / "00", record={"suite": "toy:reach2d", "suite_seed": 0, "split": "test", "index": 0})
    config = dict(suite="toy:reach2d", improver=tmp_path / "improver", policies=tmp_path / "lesser", preset="tiny", steps=2, contenders=("improver-behaviour",))

    def rows(results):
        return [(r["success"], r["mean_return"]) for r in results["per_unit"][0]["runs"]["improver-behaviour"]]

    carried = run_benchmark(BenchConfig(**config), tmp_path / "carried")
    assert {k: carried["config"][k] for k in ("task_exploration", "wide_task_exploration", "memory")} == {"task_exploration": 0.1, "wide_task_exploration": 0.5, "memory": 1}
    narrow = run_benchmark(BenchConfig(**config, wide_task_exploration=0.0), tmp_path / "narrow")
    assert narrow["config"]["wide_task_exploration"] == 0.0 and rows(narrow) != rows(carried)
    # the same settings given explicitly are the same run: it resumes
    assert rows(run_benchmark(BenchConfig(**config, task_exploration=0.1, wide_task_exploration=0.5), tmp_path / "carried")) == rows(carried)
