"""Poolings (registry `pooling`): backbone tokens (B, N, C) -> one feature vector per image (B, out_dim)."""
from __future__ import annotations

import torch
from torch import nn

from biomass.errors import ConfigError
from biomass.models.spec import FeatureSpec
from biomass.registry import POOLINGS


class MeanPatchPool(nn.Module):
    """Mean over the patch tokens, prefix tokens excluded (timm's `global_pool='avg'`, the seed's features)."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.skip, self.out_dim = spec.num_prefix_tokens, spec.dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.skip:].mean(dim=1)


class ClsPool(nn.Module):
    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.out_dim = spec.dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]


class GemPool(nn.Module):
    """Generalised mean (x clamped to eps) ** p over patch tokens; p is learnt when `learn_p`."""

    def __init__(self, spec: FeatureSpec, p: float, eps: float, learn_p: bool):
        super().__init__()
        self.skip, self.out_dim, self.eps = spec.num_prefix_tokens, spec.dim, eps
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens[:, self.skip:].float().clamp(min=self.eps).pow(self.p)
        return x.mean(dim=1).pow(1.0 / self.p).to(tokens.dtype)


class HybridTexturePooling(nn.Module):
    """The writeup's "promising but failed" pooling, generalised to any patch size, prefix count and aspect.

    Drop the prefix tokens; project each patch token to patch² × 2 values; lay them out as a (H, 2W) pixel-like
    map (B, gh, gw, p, p, 2) -> (B, gh, p, gw, p, 2) -> (B, gh·p, gw·p·2); mean over the height axis -> (B, 2W).
    """

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.skip, self.patch, (self.gh, self.gw) = spec.num_prefix_tokens, spec.patch_size, spec.grid
        self.projection = nn.Linear(spec.dim, spec.patch_size ** 2 * 2)
        self.out_dim = 2 * self.gw * self.patch

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.projection(tokens[:, self.skip:])
        b, n, _ = x.shape
        if n != self.gh * self.gw:
            raise ValueError(f"hybrid_texture: expected {self.gh}x{self.gw} patch tokens, got {n}")
        p = self.patch
        x = x.view(b, self.gh, self.gw, p, p, 2).permute(0, 1, 3, 2, 4, 5).reshape(b, self.gh * p, self.gw * p * 2)
        return x.mean(dim=1)


@POOLINGS.register("gap")
def gap(spec: FeatureSpec, /) -> nn.Module:
    """Mean over patch tokens, prefix tokens excluded (timm's avg pool; the seed's choice)."""
    return MeanPatchPool(spec)


@POOLINGS.register("cls")
def cls(spec: FeatureSpec, /) -> nn.Module:
    """The CLS token."""
    if spec.num_prefix_tokens == 0:
        raise ConfigError("model.pooling: `cls` needs a backbone with a class token (this one has none); use gap")
    return ClsPool(spec)


@POOLINGS.register("gem")
def gem(spec: FeatureSpec, /, *, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> nn.Module:
    """Generalised-mean pooling over patch tokens."""
    return GemPool(spec, p, eps, learn_p)


@POOLINGS.register("hybrid_texture")
def hybrid_texture(spec: FeatureSpec, /) -> nn.Module:
    """HybridTexturePooling from the 4th-place writeup (graveyard): per-column means of a projected pixel map."""
    return HybridTexturePooling(spec)


STATS = ("mean", "max", "min", "gem")


class MultiStatPool(nn.Module):
    """Several statistics of the patch tokens, per channel, concatenated: mean, max, min and GeM (p fixed). With a
    multi-layer backbone (`out_indices`) the channels already hold every layer, so each layer gets every stat."""

    def __init__(self, spec: FeatureSpec, stats: tuple[str, ...], p: float, eps: float):
        super().__init__()
        self.skip, self.stats, self.p, self.eps = spec.num_prefix_tokens, tuple(stats), float(p), eps
        self.out_dim = spec.dim * len(self.stats)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens[:, self.skip:]
        out = []
        for stat in self.stats:
            if stat == "mean":
                out.append(x.mean(dim=1))
            elif stat == "max":
                out.append(x.amax(dim=1))
            elif stat == "min":
                out.append(x.amin(dim=1))
            else:  # gem
                g = x.float().clamp(min=self.eps).pow(self.p).mean(dim=1).pow(1.0 / self.p)
                out.append(g.to(x.dtype))
        return torch.cat(out, dim=1)


@POOLINGS.register("multi_stat")
def multi_stat(spec: FeatureSpec, /, *, stats: tuple[str, ...] = STATS, p: float = 3.0,
               eps: float = 1e-6) -> nn.Module:
    """Mean, max, min and GeM over patch tokens, concatenated, for one or several layers (13th place)."""
    bad = [s for s in stats if s not in STATS]
    if bad or not stats:
        raise ConfigError(f"model.pooling.stats: {bad or 'none'} not among {', '.join(STATS)}")
    return MultiStatPool(spec, stats, p, eps)
