"""The demo profile, trained on data this project has never seen, against a colour-histogram ridge on the same split.

Slow (about 4 minutes on 2 cores): `python -m pytest -m slow tests/test_versus_ridge.py`. The same measurement is
`python -m biomass.bench ridge`; docs/BENCHMARKS.md records its numbers.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from biomass.baselines import versus_ridge

REPO = Path(__file__).resolve().parents[2]
MARGIN = 0.05  # "clearly above": five hundredths of weighted R² on 96 unseen test images


@pytest.mark.slow
def test_demo_profile_beats_colour_ridge_on_unseen_data(tmp_path):
    # seed 123 is used nowhere else: labels, order, borders and rendering are all new to the project
    result = versus_ridge(REPO / "experiments" / "demo.yaml", tmp_path, n_train=96, n_test=96, seed=123,
                          width=2000, height=1000)
    assert result["test_rows"] == 96 * 5
    assert result["margin"] >= MARGIN, result
