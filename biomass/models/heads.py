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

    def forward(self, features: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        if self.tabular is not None:
            features = torch.cat([features, self.tabular(tabular)], dim=1)
        z = self.fusion(features)
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
        grams = torch.stack([green, dead, clover, green + clover, green + dead + clover], dim=1)
        return self.target_space.to_standard(grams)


@HEADS.register("consistent")
def consistent(in_features: int, n_tabular: int, n_outputs: int, target_space: nn.Module, /, *,
               tabular_dims: tuple[int, ...] = (64, 128), tabular_dropout: tuple[float, ...] = (0.3, 0.3),
               fusion_dims: tuple[int, ...] = (512, 256), fusion_dropout: tuple[float, ...] = (0.4, 0.3)) -> nn.Module:
    """Fusion head that predicts Green, Dead, Clover (>= 0 g) and derives GDM and Total: mass balance by design."""
    if n_outputs != 5:
        raise ConfigError("head `consistent` predicts the five biomass targets; use it in the main stage with a "
                          "point loss (not quantile)")
    inner = FusionHead(in_features, n_tabular, 3, tabular_dims if n_tabular else (), tabular_dropout if n_tabular
                       else (), fusion_dims, fusion_dropout)
    return ConsistentHead(inner, target_space)
