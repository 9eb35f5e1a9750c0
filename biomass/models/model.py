"""The assembled model: uint8 images (+ tabular) -> raw outputs in the fold's standardised target space."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from biomass.config import StageConfig
from biomass.data.scalers import Scaler
from biomass.registry import BACKBONES, HEADS, POOLINGS


class TargetSpace(nn.Module):
    """The fold's target scaler and training range as buffers, so a checkpoint carries them.

    Used by the `consistent` head (grams -> standardised) and the `scaled_sigmoid` output activation (bounded by
    the standardised training range).
    """

    def __init__(self, n: int):
        super().__init__()
        for name, value in (("mean", 0.0), ("scale", 1.0), ("lo", -3.0), ("hi", 3.0), ("gram_scale", 1.0)):
            self.register_buffer(name, torch.full((n,), value))
        self.register_buffer("log1p", torch.zeros((), dtype=torch.bool))

    def fit(self, scaler: Scaler, standardised_train: np.ndarray) -> None:
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self.mean.copy_(t(scaler.mean))
        self.scale.copy_(t(scaler.scale))
        self.lo.copy_(t(standardised_train.min(axis=0)))
        self.hi.copy_(t(standardised_train.max(axis=0)))
        grams = scaler.inverse(standardised_train)
        self.gram_scale.copy_(t(np.maximum(grams.mean(axis=0), 1e-3)))
        self.log1p.fill_(scaler.log1p)

    def to_standard(self, grams: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(grams) if bool(self.log1p) else grams
        return (x - self.mean) / self.scale


class BiomassModel(nn.Module):
    def __init__(self, backbone: nn.Module, pooling: nn.Module, head: nn.Module, target_space: TargetSpace,
                 activation: str, pixel_mean, pixel_std, layout: str, views_merge: str):
        super().__init__()
        self.backbone, self.pooling, self.head, self.target_space = backbone, pooling, head, target_space
        self.activation, self.layout, self.views_merge = activation, layout, views_merge
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1) * 255, persistent=False)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        # uint8 travels to the device; normalising here costs the GPU nothing and the loader 4x less memory traffic
        x = (image.float() - self.pixel_mean) / self.pixel_std
        if self.layout == "halves":  # (B, 3, H, 2W) -> both halves through the one backbone
            b = x.shape[0]
            x = torch.cat(x.chunk(2, dim=3), dim=0)
            f = self.pooling(self.backbone(x))
            left, right = f[:b], f[b:]
            return torch.cat([left, right], dim=1) if self.views_merge == "concat" else (left + right) / 2
        return self.pooling(self.backbone(x))

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(image), tabular)
        if self.activation == "scaled_sigmoid":
            lo, hi = self.target_space.lo, self.target_space.hi
            k = out.shape[1] // lo.shape[0]
            out = (lo.repeat_interleave(k) + (hi - lo).repeat_interleave(k) * torch.sigmoid(out))
        return out


def build_model(stage: StageConfig, n_targets: int, n_tabular: int, outputs_per_target: int = 1,
                load_weights: bool = True) -> BiomassModel:
    """Build a stage's model from its config. `load_weights=False` skips the backbone weights file (inference:
    the fold checkpoint holds the whole model)."""
    size = tuple(stage.image.size)
    bb = dict(stage.model.backbone)
    name = bb.pop("name")
    if not load_weights:
        bb.update(weights=None, pretrained=False)
    backbone = BACKBONES.build(name, size, **bb)
    pool_cfg = dict(stage.model.pooling)
    pooling = POOLINGS.get(pool_cfg.pop("name"))(backbone.spec, **pool_cfg)
    in_features = pooling.out_dim * (2 if stage.image.layout == "halves" and stage.model.views_merge == "concat"
                                     else 1)
    target_space = TargetSpace(n_targets)
    head_cfg = dict(stage.model.head)
    head_name = head_cfg.pop("name")
    if head_name == "consistent":
        head_cfg["_target_space"] = target_space
    head = HEADS.get(head_name)(in_features, n_tabular, n_targets * outputs_per_target, **head_cfg)
    return BiomassModel(backbone, pooling, head, target_space, stage.targets.activation, stage.image.mean,
                        stage.image.std, stage.image.layout, stage.model.views_merge)
