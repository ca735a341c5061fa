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
