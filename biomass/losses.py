"""Losses (registry `loss`). Each takes per-target weights (default: the metric's .1 .1 .1 .2 .5 for the five
biomass targets, equal weights otherwise) and is the mean over batch and targets of weight_j × loss(row, j),
the seed's WeightedSmoothL1 convention. All work in the standardised target space the model predicts in.

`outputs_per_target` and `point()` let a loss ask for more than one output per target (quantiles) and say which
one is the prediction.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from biomass.constants import TARGET_WEIGHTS
from biomass.errors import ConfigError
from biomass.registry import LOSSES


class WeightedLoss(nn.Module):
    outputs_per_target = 1

    def __init__(self, n_targets: int, weights: Sequence[float] | None):
        super().__init__()
        if weights is None:
            weights = TARGET_WEIGHTS if n_targets == len(TARGET_WEIGHTS) else (1.0,) * n_targets
        if len(weights) != n_targets:
            raise ConfigError(f"loss.weights has {len(weights)} values for {n_targets} targets")
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def point(self, raw: torch.Tensor) -> torch.Tensor:
        """The prediction (B, n_targets) from the model's raw outputs."""
        return raw

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.elementwise(raw.float(), target.float()) * self.weights).mean()


class SmoothL1(WeightedLoss):
    def __init__(self, n_targets: int, weights: Sequence[float] | None, beta: float):
        super().__init__(n_targets, weights)
        self.beta = beta

    def elementwise(self, pred, target):
        return F.smooth_l1_loss(pred, target, reduction="none", beta=self.beta)


class Squared(WeightedLoss):
    def elementwise(self, pred, target):
        return F.mse_loss(pred, target, reduction="none")


class LogCosh(WeightedLoss):
    def elementwise(self, pred, target):
        x = pred - target
        # log(cosh(x)) = |x| + log1p(exp(-2|x|)) - log 2, stable for large |x|
        return x.abs() + torch.log1p(torch.exp(-2 * x.abs())) - math.log(2.0)


class Pinball(WeightedLoss):
    def __init__(self, n_targets: int, weights: Sequence[float] | None, quantiles: Sequence[float]):
        super().__init__(n_targets, weights)
        if 0.5 not in quantiles or not all(0 < q < 1 for q in quantiles):
            raise ConfigError(f"loss.quantiles must lie in (0, 1) and include 0.5 (the prediction), got {quantiles}")
        self.outputs_per_target = len(quantiles)
        self.median = list(quantiles).index(0.5)
        self.register_buffer("q", torch.tensor(quantiles, dtype=torch.float32), persistent=False)

    def point(self, raw):
        return raw.view(raw.shape[0], -1, self.outputs_per_target)[..., self.median]

    def forward(self, raw, target):
        pred = raw.float().view(raw.shape[0], -1, self.outputs_per_target)
        diff = target.float().unsqueeze(-1) - pred
        loss = torch.maximum(self.q * diff, (self.q - 1) * diff).mean(dim=-1)
        return (loss * self.weights).mean()


class BatchR2(WeightedLoss):
    def forward(self, raw, target):
        pred, target = raw.float(), target.float()
        w = self.weights.expand_as(target)
        mean = (w * target).sum() / w.sum()
        ss_tot = (w * (target - mean) ** 2).sum().clamp(min=1e-6)
        return (w * (target - pred) ** 2).sum() / ss_tot  # = 1 - R2_w of the batch


@LOSSES.register("weighted_smooth_l1")
def weighted_smooth_l1(n_targets: int, /, *, weights: tuple[float, ...] | None = None, beta: float = 1.0) -> nn.Module:
    """SmoothL1 (Huber with beta) × per-target weights: the seed's loss."""
    return SmoothL1(n_targets, weights, beta)


@LOSSES.register("mse")
def mse(n_targets: int, /, *, weights: tuple[float, ...] | None = None) -> nn.Module:
    """Squared error × per-target weights (graveyard: "pure MSE"; the seed's aux-stage loss with equal weights)."""
    return Squared(n_targets, weights)


@LOSSES.register("quantile")
def quantile(n_targets: int, /, *, weights: tuple[float, ...] | None = None,
             quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)) -> nn.Module:
    """Pinball loss over several quantiles per target; the median is the prediction (graveyard)."""
    return Pinball(n_targets, weights, quantiles)


@LOSSES.register("log_cosh")
def log_cosh(n_targets: int, /, *, weights: tuple[float, ...] | None = None) -> nn.Module:
    """log(cosh(error)) × weights: our reading of the writeup's "log loss" for a regression (graveyard)."""
    return LogCosh(n_targets, weights)


@LOSSES.register("r2")
def r2(n_targets: int, /, *, weights: tuple[float, ...] | None = None) -> nn.Module:
    """1 − weighted R² of the batch (one weighted mean, as the metric): direct R² optimisation (graveyard)."""
    return BatchR2(n_targets, weights)


class SmoothL1WithBins(SmoothL1):
    """SmoothL1 on the regression output + `ce_weight` x cross-entropy of a classifier over `bins` quantile bins per
    target. Raw outputs are (B, T, 1 + bins): the regression output first (the prediction), then the bin logits. The
    bin edges are the fold's training quantiles, fitted into the model's TargetSpace (buffers: checkpoints carry
    them) and read from there (`bind`)."""

    def __init__(self, n_targets: int, weights: Sequence[float] | None, beta: float, bins: int, ce_weight: float):
        super().__init__(n_targets, weights, beta)
        if bins < 2:
            raise ConfigError(f"loss.bins must be at least 2, got {bins}")
        self.bins, self.ce_weight, self.outputs_per_target = bins, ce_weight, 1 + bins
        self._space: list[nn.Module] = []  # a plain list: the target space stays the model's, not a submodule

    def bind(self, target_space: nn.Module) -> None:
        self._space[:] = [target_space]

    def point(self, raw):
        return raw.view(raw.shape[0], -1, self.outputs_per_target)[..., 0]

    def classes(self, target: torch.Tensor) -> torch.Tensor:
        """(B, T) bin index of each standardised target."""
        edges = self._space[0].bin_edges.to(target.device, torch.float32)
        return (target.float().unsqueeze(-1) > edges.unsqueeze(0)).sum(dim=-1)

    def forward(self, raw, target):
        out = raw.float().view(raw.shape[0], -1, self.outputs_per_target)
        regression = (self.elementwise(out[..., 0], target.float()) * self.weights).mean()
        logits = out[..., 1:]
        ce = F.cross_entropy(logits.reshape(-1, self.bins), self.classes(target).reshape(-1), reduction="none")
        return regression + self.ce_weight * (ce.view_as(target) * self.weights).mean()


@LOSSES.register("weighted_smooth_l1_ce")
def weighted_smooth_l1_ce(n_targets: int, /, *, weights: tuple[float, ...] | None = None, beta: float = 1.0,
                          bins: int = 7, ce_weight: float = 0.3) -> nn.Module:
    """Weighted SmoothL1 + ce_weight x CE over per-fold quantile bins per target (1st place: 7 bins, weight .3)."""
    return SmoothL1WithBins(n_targets, weights, beta, bins, ce_weight)
