"""Pytest configuration shared by every test file: hypothesis profile, seeded rng, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import DATA_DIR, RESNETS_DIR

# Property tests must stay fast on a shared 2-core machine: few examples, no per-example deadline
# (the first example pays for imports and BLAS warm-up).
settings.register_profile("default", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")
# Every run, CI's included, loads the derandomized "ci" profile: the same examples each time and no
# example database, so a failure reproduces exactly. HYPOTHESIS_PROFILE=explore draws fresh ones.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", parent=settings.get_profile("default"), max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def resnet20_path() -> Path:
    path = RESNETS_DIR / "resnet20.onnx"
    if not path.is_file():
        pytest.skip(f"{path} not found (real data lives outside the repository)")
    return path
