"""Shared fixtures: one tiny synthetic dataset per session, every registry filled."""
from __future__ import annotations

from pathlib import Path

import pytest

from biomass.data.synthetic import generate
from biomass.registry import load_components

load_components()  # parametrised tests list the registries at collection time

REPO = Path(__file__).resolve().parents[1]
SYN_W, SYN_H, SYN_TRAIN, SYN_TEST = 64, 32, 10, 3


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A read-only Kaggle-layout dataset: 10 train + 3 test images of 64x32. Copy files before changing them."""
    return generate(tmp_path_factory.mktemp("synthetic") / "data", n_train=SYN_TRAIN, n_test=SYN_TEST, seed=0,
                    width=SYN_W, height=SYN_H)
