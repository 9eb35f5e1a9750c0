"""Inference pieces: TTA views and averaging, fold weights, the mass-balance projection, the leak check."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from biomass.config import load_experiment
from biomass.constants import TARGETS
from biomass.data.scalers import Scaler
from biomass.errors import ConfigError
from biomass.infer import FoldModel, fold_weights, mass_balance, predict_batch, views
from biomass.losses import weighted_smooth_l1
from biomass.train import chain_is_leaky

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_views_flip_the_right_axes():
    x = torch.arange(2 * 3 * 2 * 4).view(2, 3, 2, 4)
    out = dict(zip(["none", "hflip", "vflip", "hvflip"], views(x, ["none", "hflip", "vflip", "hvflip"])))
    assert torch.equal(out["none"], x)
    assert torch.equal(out["hflip"], x.flip(-1))
    assert torch.equal(out["vflip"], x.flip(-2))
    assert torch.equal(out["hvflip"], x.flip(-1).flip(-2))


class LeftColumn(nn.Module):
    """Predicts the mean of the image's left-most column: a flip changes it, so TTA averaging is visible."""

    def forward(self, image, tabular):
        v = image.float()[:, :, :, 0].mean(dim=(1, 2))
        return v[:, None].repeat(1, len(TARGETS)) + (tabular.sum(1, keepdim=True) if tabular.numel() else 0)


def identity_scaler(n: int) -> Scaler:
    return Scaler(np.zeros(n), np.ones(n))


def test_tta_averages_the_views_and_folds_blend_with_weights():
    image = torch.zeros(1, 3, 4, 4)
    image[..., 0] = 10.0  # left column 10, right column 0
    fold = FoldModel(0, LeftColumn(), weighted_smooth_l1(5), identity_scaler(5), None)
    blend = torch.tensor([1.0])
    plain, _ = predict_batch(image, [], [fold], blend, ["none"], None)
    tta, _ = predict_batch(image, [], [fold], blend, ["none", "hflip"], None)
    assert torch.allclose(plain, torch.full((1, 5), 10.0))
    assert torch.allclose(tta, torch.full((1, 5), 5.0))  # (10 + 0) / 2
    scaled = FoldModel(1, LeftColumn(), weighted_smooth_l1(5), Scaler(np.ones(5), 2 * np.ones(5)), None)
    two, _ = predict_batch(image, [], [fold, scaled], torch.tensor([0.25, 0.75]), ["none"], None)
    assert torch.allclose(two, torch.full((1, 5), 0.25 * 10 + 0.75 * (10 * 2 + 1)))


def test_aux_predictions_are_averaged_in_original_units_then_restandardised_per_fold():
    class Const(nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, image, tabular):
            return torch.full((image.shape[0], 2), self.value)

    aux = [FoldModel(0, Const(0.0), weighted_smooth_l1(2), Scaler(np.array([1.0, 10.0]), np.ones(2)), None),
           FoldModel(1, Const(1.0), weighted_smooth_l1(2), Scaler(np.array([3.0, 20.0]), np.ones(2)), None)]

    class TabOnly(nn.Module):
        def forward(self, image, tabular):
            return tabular[:, :1].repeat(1, 5)

    main = [FoldModel(0, TabOnly(), weighted_smooth_l1(5), identity_scaler(5),
                      Scaler(np.array([2.0, 0.0]), np.array([0.5, 1.0])))]
    pred, aux_pred = predict_batch(torch.zeros(2, 3, 4, 4), aux, main, torch.tensor([1.0]), ["none"], None)
    assert torch.allclose(aux_pred, torch.tensor([[2.5, 15.5]] * 2))  # mean of (1, 10) and (4, 21)
    assert torch.allclose(pred, torch.full((2, 5), (2.5 - 2.0) / 0.5))


def test_mass_balance_projection():
    rng = np.random.default_rng(0)
    pred = rng.uniform(0, 50, size=(20, 5))
    out = mass_balance(pred)
    green, dead, clover, gdm, total = out.T
    assert np.allclose(gdm, green + clover) and np.allclose(total, green + dead + clover)
    balanced = out.copy()
    assert np.allclose(mass_balance(balanced), balanced)  # a projection: balanced input is unchanged


def test_fold_weights(tmp_path):
    cfg = load_experiment(REPO / "experiments/demo.yaml").config
    folds = [FoldModel(k, nn.Identity(), nn.Identity(), identity_scaler(5), None) for k in range(3)]
    assert np.allclose(fold_weights(cfg, tmp_path, folds), [1 / 3] * 3)
    cfg.infer.fold_weights = [2.0, 1.0, 1.0]
    assert np.allclose(fold_weights(cfg, tmp_path, folds), [0.5, 0.25, 0.25])
    cfg.infer.fold_weights = [1.0, 1.0]
    with pytest.raises(ConfigError, match="2 values for 3 main folds"):
        fold_weights(cfg, tmp_path, folds)
    cfg.infer.fold_weights = "cv"
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"folds": {"main": {"0": {"score": 0.6}, "1": {"score": 0.2}, "2": {"score": -0.1}}}}))
    assert np.allclose(fold_weights(cfg, tmp_path, folds), [0.75, 0.25, 0.0])


def test_gold_fold_weights_are_the_seeds():
    cfg = load_experiment(REPO / "experiments/gold.yaml").config
    assert cfg.infer.fold_weights == [0.2649, 0.1741, 0.1578, 0.2318, 0.1714]
    assert cfg.infer.tta == ["none", "hflip", "vflip"]


def test_leak_check():
    gold = load_experiment(REPO / "experiments/gold.yaml").config
    same = np.array([0, 1, 2, 0, 1, 2])
    other = np.array([1, 0, 2, 2, 1, 0])
    assert "fold-0" in chain_is_leaky(gold, same, other)  # the seed's chain: init from main/fold0
    demo = load_experiment(REPO / "experiments/demo.yaml").config
    assert demo.aux.init_from == "main/same_fold"
    assert chain_is_leaky(demo, same, same) is None
    assert "differ" in chain_is_leaky(demo, same, other)
    demo.aux.init_from = None
    assert chain_is_leaky(demo, same, other) is None
