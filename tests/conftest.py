"""Shared fixtures: suites are cached per process by `make_suite`, so tests share them."""

from __future__ import annotations

import pytest

from improver.tasks import make_suite


@pytest.fixture(scope="session")
def toy():
    return make_suite("toy:reach2d", seed=0)


@pytest.fixture(scope="session")
def push():
    return make_suite("ML1:push-v3", seed=0)


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    """A tiny toy-suite improvement dataset (3 tasks, 2 zoo members each)."""
    from improver.augment.generate import GenerateConfig, generate

    out = tmp_path_factory.mktemp("toy-dataset")
    generate(GenerateConfig("toy:reach2d", preset="tiny", seed=0), out, progress=False)
    return out
