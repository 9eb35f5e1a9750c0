"""Heads (registry `head`): pooled image features (+ tabular inputs) -> one output per target (standardised).

Builders take (in_features, n_tabular, n_outputs, target_space) as runtime context; `target_space` is the model's
TargetSpace (the fold's scaler as buffers), which a head that works in grams (`consistent`) needs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from biomass.errors import ConfigError
from biomass.registry import HEADS


def mlp(in_dim: int, dims: Sequence[int], dropouts: Sequence[float]) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> Dropout per layer, the seed's block."""
    if len(dims) != len(dropouts):
        raise ConfigError(f"head: {len(dims)} layer widths but {len(dropouts)} dropouts; give one dropout per layer")
    layers: list[nn.Module] = []
    for dim, drop in zip(dims, dropouts):
        layers += [nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Dropout(drop)]
        in_dim = dim
    return nn.Sequential(*layers)


class FusionHead(nn.Module):
    """Tabular branch + fusion MLP + independent linear outputs (one per target, as the seed's five heads)."""

    def __init__(self, in_features: int, n_tabular: int, n_outputs: int, tabular_dims: Sequence[int],
                 tabular_dropout: Sequence[float], fusion_dims: Sequence[int], fusion_dropout: Sequence[float]):
        super().__init__()
        self.tabular = mlp(n_tabular, tabular_dims, tabular_dropout) if n_tabular else None
        fused_in = in_features + (tabular_dims[-1] if n_tabular and tabular_dims else n_tabular)
        self.fusion = mlp(fused_in, fusion_dims, fusion_dropout)
        last = fusion_dims[-1] if fusion_dims else fused_in
        self.outputs = nn.ModuleList(nn.Linear(last, 1) for _ in range(n_outputs))

    def trunk(self, features: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        """The fused hidden vector ahead of the linear outputs."""
        if self.tabular is not None:
            features = torch.cat([features, self.tabular(tabular)], dim=1)
        return self.fusion(features)

    def forward(self, features: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        z = self.trunk(features, tabular)
        return torch.cat([out(z) for out in self.outputs], dim=1)


@HEADS.register("fusion")
def fusion(in_features: int, n_tabular: int, n_outputs: int, target_space: nn.Module, /, *,
           tabular_dims: tuple[int, ...] = (64, 128), tabular_dropout: tuple[float, ...] = (0.3, 0.3),
           fusion_dims: tuple[int, ...] = (512, 256), fusion_dropout: tuple[float, ...] = (0.4, 0.3)) -> nn.Module:
    """The seed's multi-modal head: tabular 2->64->128, concat with image features, ->512->256, 5 linear outputs."""
    if not n_tabular:
        raise ConfigError("head `fusion` needs tabular inputs; this stage has none (use `image_only`)")
    return FusionHead(in_features, n_tabular, n_outputs, tabular_dims, tabular_dropout, fusion_dims, fusion_dropout)


@HEADS.register("image_only")
def image_only(in_features: int, n_tabular: int, n_outputs: int, target_space: nn.Module, /, *,
               fusion_dims: tuple[int, ...] = (512, 256), fusion_dropout: tuple[float, ...] = (0.4, 0.3)) -> nn.Module:
    """The fusion MLP on image features alone (no NDVI/Height input), for ablations."""
    return FusionHead(in_features, 0, n_outputs, (), (), fusion_dims, fusion_dropout)


@HEADS.register("aux_mlp")
def aux_mlp(in_features: int, n_tabular: int, n_outputs: int, target_space: nn.Module, /, *, hidden: int = 256,
            dropout: float = 0.0) -> nn.Module:
    """The seed's stage-2 head: Linear(->256), BatchNorm, ReLU, Linear(->outputs); image features only."""
    layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return _ImageOnly(nn.Sequential(*layers, nn.Linear(hidden, n_outputs)))


class _ImageOnly(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(features)


def balanced_grams(green: torch.Tensor, dead: torch.Tensor, clover: torch.Tensor) -> torch.Tensor:
    """The five targets in TARGETS order from the three components: GDM = Green + Clover, Total = all three."""
    return torch.stack([green, dead, clover, green + clover, green + dead + clover], dim=1)


def _inner(in_features: int, n_tabular: int, n_outputs: int, tabular_dims, tabular_dropout, fusion_dims,
           fusion_dropout) -> FusionHead:
    """A FusionHead with or without its tabular branch (as the stage has NDVI/Height inputs or not)."""
    return FusionHead(in_features, n_tabular, n_outputs, tabular_dims if n_tabular else (),
                      tabular_dropout if n_tabular else (), fusion_dims, fusion_dropout)


class ConsistentHead(nn.Module):
    """Predicts Green, Dead, Clover as non-negative grams; GDM = Green + Clover and Total = GDM + Dead follow, so the
    mass balance holds by construction. Returns all five in the standardised target space of the fold's scaler,
    which the model sets through `target_space` before training."""

    def __init__(self, inner: FusionHead, target_space: nn.Module):
        super().__init__()
        self.inner, self.target_space = inner, target_space

    def forward(self, features: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        # Start near the training means: softplus(z) * each component's mean grams (Green, Dead, Clover come first
        # in TARGETS) keeps early outputs in a sane range.
        parts = nn.functional.softplus(self.inner(features, tabular)) * self.target_space.gram_scale[:3]
        green, dead, clover = parts.unbind(dim=1)
        grams = balanced_grams(green, dead, clover)
        return self.target_space.to_standard(grams)


@HEADS.register("consistent")
def consistent(in_features: int, n_tabular: int, n_outputs: int, target_space: nn.Module, /, *,
               tabular_dims: tuple[int, ...] = (64, 128), tabular_dropout: tuple[float, ...] = (0.3, 0.3),
               fusion_dims: tuple[int, ...] = (512, 256), fusion_dropout: tuple[float, ...] = (0.4, 0.3)) -> nn.Module:
    """Fusion head that predicts Green, Dead, Clover (>= 0 g) and derives GDM and Total: mass balance by design."""
    if n_outputs != 5:
        raise ConfigError("head `consistent` predicts the five biomass targets; use it in the main stage with a "
                          "point loss (not quantile)")
    return ConsistentHead(_inner(in_features, n_tabular, 3, tabular_dims, tabular_dropout, fusion_dims, fusion_dropout),
                          target_space)


class RatioHead(nn.Module):
    """Total (>= 0 g) times a softmax composition over Green, Dead, Clover; GDM = Green + Clover and Total = the sum
    of the three, so the mass balance holds by construction. Outputs the five targets in the standardised space."""

    def __init__(self, inner: FusionHead, target_space: nn.Module):
        super().__init__()
        self.inner, self.target_space = inner, target_space

    def forward(self, features: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        z = self.inner(features, tabular).float()
        total = nn.functional.softplus(z[:, 0]) * self.target_space.gram_scale[4]  # starts near the mean Total
        green, dead, clover = (torch.softmax(z[:, 1:4], dim=1) * total.unsqueeze(1)).unbind(dim=1)
        grams = balanced_grams(green, dead, clover)
        return self.target_space.to_standard(grams)


@HEADS.register("ratio")
def ratio(in_features: int, n_tabular: int, n_outputs: int, target_space: nn.Module, /, *,
          tabular_dims: tuple[int, ...] = (64, 128), tabular_dropout: tuple[float, ...] = (0.3, 0.3),
          fusion_dims: tuple[int, ...] = (512, 256), fusion_dropout: tuple[float, ...] = (0.4, 0.3)) -> nn.Module:
    """Total x softmax(Green, Dead, Clover) ratios; GDM and Total derived (6th/9th places' composition heads)."""
    if n_outputs != 5:
        raise ConfigError("head `ratio` predicts the five biomass targets; use it in the main stage with a point loss")
    return RatioHead(_inner(in_features, n_tabular, 4, tabular_dims, tabular_dropout, fusion_dims, fusion_dropout),
                     target_space)


class IntervalHead(nn.Module):
    """The fusion trunk with one linear regression output per target plus a classifier over `bins` intervals per
    target. Output (B, T * (1 + bins)) laid out as (B, T, [regression, bin logits...]), as the loss reads it."""

    def __init__(self, inner: FusionHead, hidden: int, n_targets: int, bins: int):
        super().__init__()
        self.inner, self.n_targets, self.bins = inner, n_targets, bins
        self.classifier = nn.Linear(hidden, n_targets * bins)

    def forward(self, features: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        z = self.inner.trunk(features, tabular)
        reg = torch.cat([out(z) for out in self.inner.outputs], dim=1).unsqueeze(-1)  # (B, T, 1)
        logits = self.classifier(z).view(-1, self.n_targets, self.bins)
        return torch.cat([reg, logits], dim=2).flatten(1)


@HEADS.register("interval_aux")
def interval_aux(in_features: int, n_tabular: int, n_outputs: int, target_space: nn.Module, /, *,
                 tabular_dims: tuple[int, ...] = (64, 128), tabular_dropout: tuple[float, ...] = (0.3, 0.3),
                 fusion_dims: tuple[int, ...] = (512, 256),
                 fusion_dropout: tuple[float, ...] = (0.4, 0.3)) -> nn.Module:
    """Regression outputs + an auxiliary interval classifier per target (1st place); pair it with the loss
    `weighted_smooth_l1_ce`, which sets the number of bins and scores the regression outputs."""
    n_targets = target_space.mean.numel()
    bins = n_outputs // n_targets - 1
    if n_outputs % n_targets or bins < 2 or not hasattr(target_space, "bin_edges"):
        raise ConfigError("head `interval_aux` needs a loss with interval bins: loss {name: weighted_smooth_l1_ce}")
    inner = _inner(in_features, n_tabular, n_targets, tabular_dims, tabular_dropout, fusion_dims, fusion_dropout)
    hidden = fusion_dims[-1] if fusion_dims else inner.outputs[0].in_features
    return IntervalHead(inner, hidden, n_targets, bins)
