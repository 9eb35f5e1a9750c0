"""The linear probe baseline: features of the experiment's own backbone, ridge with alpha by inner CV."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from biomass.baselines.probe import ALPHAS, fit_predict_probe, fit_ridge
from biomass.metrics import weighted_r2

REPO = Path(__file__).resolve().parents[2]


def test_the_ridge_alpha_comes_from_inner_cv_not_from_the_edge_of_the_grid():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(96, 5))  # a few latent factors behind many correlated features, as pooled features are
    x = z @ rng.normal(size=(5, 400)) + rng.normal(size=(96, 400))
    y = z @ rng.normal(size=(5, 5)) * 10 + 50 + rng.normal(size=(96, 5)) * 3
    model = fit_ridge(x[:64], y[:64])
    assert ALPHAS[0] < model.best_params_["ridge__alpha"] < ALPHAS[-1]
    assert weighted_r2(y[64:], model.predict(x[64:])) > 0.5


def test_the_probe_writes_a_submission_from_the_experiments_backbone(tmp_path):
    from biomass.data.synthetic import generate

    data = generate(tmp_path / "data", n_train=12, n_test=4, seed=3, width=128, height=64)
    sub = fit_predict_probe(REPO / "experiments" / "demo.yaml", data,
                            ("main.image.size=[32,32]", "aux.image.size=[32,32]",
                             "main.model.backbone.model_name=test_resnet", "main.model.backbone.weights=null"))
    expected = pd.read_csv(data / "test.csv")
    assert list(sub["sample_id"]) == list(expected["sample_id"])
    assert np.isfinite(sub["target"]).all() and (sub["target"] >= 0).all()
