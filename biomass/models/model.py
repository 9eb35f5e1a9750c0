"""The assembled model: uint8 images (+ tabular) -> raw outputs in the fold's standardised target space.

Built from config by `engine.build.build_stage_model`; this module knows nothing of configs.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from biomass.data.scalers import Scaler, standardise, unstandardise


class TargetSpace(nn.Module):
    """The fold's target scaler and training range as buffers, so a checkpoint carries them.

    Used by `BiomassModel.predict` (standardised -> original units), the `consistent` head (grams ->
    standardised) and the `scaled_sigmoid` output activation (bounded by the standardised training range).
    """

    def __init__(self, n: int, bins: int = 0):
        super().__init__()
        for name, value in (("mean", 0.0), ("scale", 1.0), ("lo", -3.0), ("hi", 3.0), ("gram_scale", 1.0)):
            self.register_buffer(name, torch.full((n,), value))
        self.register_buffer("log1p", torch.zeros((), dtype=torch.bool))
        if bins:  # interval classification: inner edges of `bins` quantile bins per target (standardised space)
            self.register_buffer("bin_edges", torch.zeros(n, bins - 1))

    def fit(self, scaler: Scaler, standardised_train: np.ndarray) -> None:
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self.mean.copy_(t(scaler.mean))
        self.scale.copy_(t(scaler.scale))
        self.lo.copy_(t(standardised_train.min(axis=0)))
        self.hi.copy_(t(standardised_train.max(axis=0)))
        grams = scaler.inverse(standardised_train)
        self.gram_scale.copy_(t(np.maximum(grams.mean(axis=0), 1e-3)))
        self.log1p.fill_(scaler.log1p)
        if hasattr(self, "bin_edges"):  # quantiles of the fold's training targets
            k = self.bin_edges.shape[1] + 1
            q = np.quantile(standardised_train, np.arange(1, k) / k, axis=0).T  # (n, k-1)
            self.bin_edges.copy_(t(q))

    def _log1p(self) -> bool:
        return False if self.log1p.is_meta else bool(self.log1p)  # meta device (dry runs): shapes only

    def to_standard(self, values: torch.Tensor) -> torch.Tensor:
        return standardise(values, self.mean, self.scale, self._log1p())

    def to_original(self, values: torch.Tensor) -> torch.Tensor:
        return unstandardise(values, self.mean, self.scale, self._log1p())


class BiomassModel(nn.Module):
    """backbone -> [fusion: mix the views' tokens] -> pooling (per view) -> [fusion: join the views] -> head
    (+ tabular) -> optional output activation.

    `point` picks the prediction from the raw outputs (the loss's choice: the median of quantile outputs, say), so
    `predict` returns point predictions in original units.
    """

    def __init__(self, backbone: nn.Module, pooling: nn.Module, head: nn.Module, target_space: TargetSpace,
                 activation: str, pixel_mean, pixel_std, layout: str, fusion: nn.Module | None,
                 point: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.backbone, self.pooling, self.head, self.target_space = backbone, pooling, head, target_space
        self.activation, self.layout, self.point = activation, layout, point
        self.fusion = fusion if layout == "halves" else None  # models.fusion: mixes and joins the two views
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1) * 255, persistent=False)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        # uint8 travels to the device; normalising here costs the GPU nothing and the loader 4x less memory traffic
        x = (image.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std  # the weights' dtype
        if self.layout == "halves":  # (B, 3, H, 2W) -> both halves through the one backbone as a batch of 2B
            x = torch.cat(x.chunk(2, dim=3), dim=0)
            return self.fusion(self.pooling(self.fusion.mix_tokens(self.backbone(x))))
        return self.pooling(self.backbone(x))

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        features = self.features(image)
        out = self.head(features, tabular.to(features.dtype))
        if self.activation == "scaled_sigmoid":
            lo, hi = self.target_space.lo, self.target_space.hi
            k = out.shape[1] // lo.shape[0]
            out = (lo.repeat_interleave(k) + (hi - lo).repeat_interleave(k) * torch.sigmoid(out))
        return out

    def predict(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        """Point predictions in original units (grams, or NDVI and cm), float32."""
        return self.target_space.to_original(self.point(self(image, tabular).float()))
