"""The backbone -> pooling contract: what a backbone's tokens are, so a pooling can read them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSpec:
    dim: int  # channels per token
    num_prefix_tokens: int  # CLS + register tokens ahead of the patch grid
    patch_size: int  # pixels per token side (the stride, for CNNs)
    grid: tuple[int, int]  # patch-grid rows and columns for the configured image size
    layers: int = 1  # blocks whose tokens are concatenated along channels (backbone `out_indices`); dim counts all
