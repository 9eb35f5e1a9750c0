"""Shared fixtures: one tiny synthetic dataset per session, every registry filled."""
from __future__ import annotations

from pathlib import Path

import pytest

from biomass.data.synthetic import generate
import biomass.components  # noqa: F401  (parametrised tests list the registries at collection time)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A read-only Kaggle-layout dataset: 10 train + 3 test images of 64x32. Copy files before changing them."""
    return generate(tmp_path_factory.mktemp("synthetic") / "data", n_train=10, n_test=3, seed=0, width=64,
                    height=32)
