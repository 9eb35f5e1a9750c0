"""View fusions (registry `fusion`): how the two views of `image.layout: halves` become one feature vector.

Both halves run through the one backbone as a batch of 2B. A fusion may first mix the two views' tokens
(`mix_tokens`, (2B, N, C) -> (2B, N, C): the 1st place's cross-view self-attention), then joins the pooled features
(`forward`, (2B, D) -> (B, out_dim(D))) by concatenation or mean. Builders take the backbone's FeatureSpec and the
pooling's output width as runtime context. With `image.layout: whole` there is one view and no fusion runs.
"""
from __future__ import annotations

import torch
from torch import nn

from biomass.errors import ConfigError
from biomass.models.spec import FeatureSpec
from biomass.registry import FUSIONS

MERGES = ("concat", "mean")


def _encoder(dim: int, heads: int, layers: int, mlp_ratio: float, dropout: float) -> nn.TransformerEncoder:
    if dim % heads:
        raise ConfigError(f"model.fusion.heads={heads} must divide the feature width {dim}")
    layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class ViewFusion(nn.Module):
    """Optional attention across the views (over tokens or over pooled vectors), then concat or mean."""

    def __init__(self, merge: str, n_views: int = 2, encoder: nn.Module | None = None, dim: int = 0,
                 on: str = "tokens"):
        super().__init__()
        if merge not in MERGES:
            raise ConfigError(f"model.fusion.merge: {merge!r} is not one of {', '.join(MERGES)}")
        self.merge, self.n_views, self.on, self.encoder = merge, n_views, on, encoder
        # one learnt embedding per view, added before attention so the layer knows which half a token comes from
        self.view_embed = nn.Parameter(torch.zeros(n_views, dim)) if encoder is not None else None

    def out_dim(self, pooled_dim: int) -> int:
        return pooled_dim * self.n_views if self.merge == "concat" else pooled_dim

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """(V*B, N, C) views stacked on the batch -> attention over the V*N tokens of each image -> same shape."""
        vb, n, c = x.shape
        b = vb // self.n_views
        x = x.view(self.n_views, b, n, c) + self.view_embed.view(self.n_views, 1, 1, c).to(x.dtype)
        x = x.permute(1, 0, 2, 3).reshape(b, self.n_views * n, c)
        x = self.encoder(x)
        return x.view(b, self.n_views, n, c).permute(1, 0, 2, 3).reshape(vb, n, c)

    def mix_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._attend(tokens) if self.encoder is not None and self.on == "tokens" else tokens

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None and self.on == "pooled":
            pooled = self._attend(pooled.unsqueeze(1)).squeeze(1)
        views = pooled.chunk(self.n_views, dim=0)
        return torch.cat(views, dim=1) if self.merge == "concat" else torch.stack(views).mean(dim=0)


@FUSIONS.register("concat")
def concat(spec: FeatureSpec, pooled_dim: int, /) -> nn.Module:
    """The views' pooled features side by side (the seed's dual-image input; head input 2 x pooled width)."""
    return ViewFusion("concat")


@FUSIONS.register("mean")
def mean(spec: FeatureSpec, pooled_dim: int, /) -> nn.Module:
    """The mean of the views' pooled features (head input = pooled width)."""
    return ViewFusion("mean")


@FUSIONS.register("cross_attention")
def cross_attention(spec: FeatureSpec, pooled_dim: int, /, *, over: str = "tokens", heads: int = 4, layers: int = 1,
                    mlp_ratio: float = 2.0, dropout: float = 0.0, merge: str = "concat") -> nn.Module:
    """Transformer layer(s) across both views (1st place: cross-view self-attention), on the backbone tokens of the
    two halves (`over: tokens`) or over their two pooled vectors (`over: pooled`); then concat or mean."""
    if over not in ("tokens", "pooled"):
        raise ConfigError(f"model.fusion.over: {over!r} is not one of tokens, pooled")
    dim = spec.dim if over == "tokens" else pooled_dim
    return ViewFusion(merge, 2, _encoder(dim, heads, layers, mlp_ratio, dropout), dim, over)
