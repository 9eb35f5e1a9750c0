"""Shared fixtures: the demo experiment and its tiny setting, one tiny synthetic dataset per session, every registry
filled. (`helpers.py` holds the same constants for module-level use: parametrize lists and helpers.)"""
from __future__ import annotations

from pathlib import Path

import pytest

from biomass.data.synthetic import generate
import biomass.components  # noqa: F401  (parametrised tests list the registries at collection time)
from helpers import DEMO, GOLD, TINY, TINY_MAIN_ONLY


@pytest.fixture(scope="session")
def demo() -> Path:
    """experiments/demo.yaml with the random-init CNN it had before it became pretrained (tests/configs/): gold's
    structure on the synthetic data, scaled for a CPU and for seconds of training."""
    return DEMO


@pytest.fixture(scope="session")
def gold() -> Path:
    return GOLD


@pytest.fixture(scope="session")
def tiny() -> list[str]:
    """Overrides that make the demo train in seconds (32 px resnet10t, 2 + 1 epochs)."""
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_main_only() -> list[str]:
    """The tiny demo without its aux stage."""
    return list(TINY_MAIN_ONLY)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A read-only Kaggle-layout dataset: 12 train + 4 test images of 128x64 (sweeps and ablations train on it)."""
    return generate(tmp_path_factory.mktemp("tiny") / "data", n_train=12, n_test=4, seed=0, width=128, height=64)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A read-only Kaggle-layout dataset: 10 train + 3 test images of 64x32. Copy files before changing them."""
    return generate(tmp_path_factory.mktemp("synthetic") / "data", n_train=10, n_test=3, seed=0, width=64,
                    height=32)
