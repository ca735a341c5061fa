"""User task suites: registration, plugin loading (IMPROVER_PLUGINS, entry points), the CLI, and
the example suite (Gymnasium's MuJoCo Reacher with hidden goals) defined only in examples/."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from improver.tasks import make_suite, rollout
from improver.tasks import registry
from improver.tasks.registry import register_suite, unregister_suite
from improver.tasks.toy import reach2d_suite

ROOT = Path(__file__).resolve().parents[1]
REACHER = ROOT / "examples" / "reacher_suite.py"


def renamed(suite, name):
    """The toy suite under another name (as a user suite must carry its own name)."""
    splits = {s: tuple(replace(t, suite=name) for t in ts) for s, ts in suite.splits.items()}
    return replace(suite, name=name, splits=splits)


@pytest.fixture
def clean_registry():
    before = dict(registry.SUITES)
    yield
    registry.SUITES.clear()
    registry.SUITES.update(before)
    registry.make_suite.cache_clear()


def test_registered_suite_is_made_by_name_with_its_seed(clean_registry):
    @register_suite("mine")
    def build(seed):
        return renamed(reach2d_suite(seed), "mine")

    suite = make_suite("mine", seed=3)
    assert suite.name == "mine" and suite.seed == 3
    assert {t.suite for t in suite.tasks("test")} == {"mine"}
    assert build(0).name == "mine"  # the decorator hands the function back


def test_suite_with_an_argument(clean_registry):
    register_suite("family", lambda arg, seed: renamed(reach2d_suite(seed), f"family:{arg}"), needs_argument=True)
    assert make_suite("family:a").name == "family:a"
    with pytest.raises(ValueError, match="needs a task after a colon"):
        make_suite("family")


@pytest.mark.parametrize(
    "kind, builder, error, match",
    [
        ("toy", lambda seed: None, ValueError, "built-in"),
        ("a:b", lambda seed: None, ValueError, "no colon"),
        ("", lambda seed: None, ValueError, "no colon"),
        ("ok", "not a function", TypeError, "needs a function"),
    ],
)
def test_bad_registrations_are_refused(clean_registry, kind, builder, error, match):
    with pytest.raises(error, match=match):
        register_suite(kind, builder)


def test_a_name_is_not_taken_twice_unless_replaced(clean_registry):
    register_suite("twice", lambda seed: renamed(reach2d_suite(seed), "twice"))
    with pytest.raises(ValueError, match="registered already"):
        register_suite("twice", lambda seed: renamed(reach2d_suite(seed), "twice"))
    first = make_suite("twice")
    register_suite("twice", lambda seed: renamed(reach2d_suite(seed + 7), "twice"), replace=True)
    assert make_suite("twice") is not first  # the cache does not serve the replaced suite
    unregister_suite("twice")
    with pytest.raises(ValueError, match="unknown suite 'twice'"):
        make_suite("twice")
    with pytest.raises(ValueError, match="not a registered user suite"):
        unregister_suite("ML10")


def test_a_builder_must_return_a_suite_carrying_its_name(clean_registry):
    register_suite("misnamed", lambda seed: reach2d_suite(seed))
    with pytest.raises(ValueError, match="must be 'misnamed'"):
        make_suite("misnamed")
    register_suite("nothing", lambda seed: 42)
    with pytest.raises(ValueError, match="returned a int"):
        make_suite("nothing")


def test_plugins_are_imported_for_unknown_names(clean_registry, monkeypatch, tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from dataclasses import replace\n"
        "from improver.tasks.registry import register_suite\n"
        "from improver.tasks.toy import reach2d_suite\n"
        "@register_suite('plugged')\n"
        "def build(seed):\n"
        "    s = reach2d_suite(seed)\n"
        "    return replace(s, name='plugged', splits={k: tuple(replace(t, suite='plugged') for t in v) for k, v in s.splits.items()})\n"
    )
    monkeypatch.setenv(registry.PLUGINS_VARIABLE, f" {plugin} ,")
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert make_suite("plugged").name == "plugged"
    registry.load_plugins(force=True)  # importing the same file again does not register it twice

    monkeypatch.setenv(registry.PLUGINS_VARIABLE, "no_such_module_here")
    with pytest.raises(ValueError, match="does not import"):
        registry.load_plugins(force=True)
    monkeypatch.setenv(registry.PLUGINS_VARIABLE, str(tmp_path / "missing.py"))
    with pytest.raises(ValueError, match="not a file"):
        registry.load_plugins(force=True)


def test_entry_points_are_loaded(clean_registry, monkeypatch):
    class EntryPoint:
        def load(self):
            return lambda: register_suite("from-entry-point", lambda seed: renamed(reach2d_suite(seed), "from-entry-point"))

    monkeypatch.delenv(registry.PLUGINS_VARIABLE, raising=False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [EntryPoint()] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert make_suite("from-entry-point").name == "from-entry-point"


def test_unknown_suite_error_says_how_to_register(clean_registry, monkeypatch):
    monkeypatch.delenv(registry.PLUGINS_VARIABLE, raising=False)
    with pytest.raises(ValueError, match="IMPROVER_PLUGINS"):
        make_suite("nonexistent")


@pytest.fixture(scope="module")
def reacher():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(registry.PLUGINS_VARIABLE, str(REACHER))
        registry.load_plugins(force=True)
    return make_suite("reacher")


def test_reacher_suite_follows_the_contract(reacher):
    train, test = reacher.tasks("train"), reacher.tasks("test")
    goals = lambda tasks: {tuple(round(g, 6) for g in t.build.args[0]) for t in tasks}  # noqa: E731
    assert len(train) == 50 and len(test) == 10 and not goals(train) & goals(test)
    expert = rollout(reacher.expert, test[:4], 1, progress=False)
    still = rollout(lambda obs: torch.zeros(obs.shape[0], 2), test[:4], 1, progress=False)
    assert expert.success.all() and not still.success.any()
    assert expert.returns.mean() > still.returns.mean()
    # goal hidden: with the same reset seed, two goals give the same first observation
    first = [rollout(reacher.expert, task, 1, seed=5, progress=False).observations[0, 0] for task in test[:2]]
    assert torch.equal(first[0], first[1])
    assert expert.observations.shape[-1] == reacher.observation_dim == 8


def test_cli_finds_a_user_suite_through_the_plugin_variable(tmp_path):
    env = {**os.environ, "IMPROVER_PLUGINS": str(REACHER), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "improver.cli", "rollout", "--suite", "reacher", "--split", "test", "--policy", "expert",
         "--episodes", "1", "--json-out", str(tmp_path / "rows.json")],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert rows and all(row["success"] == 1.0 for row in rows)  # (without the variable: test_unknown_suite_error_says_how_to_register)
