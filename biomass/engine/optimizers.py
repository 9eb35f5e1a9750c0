"""Optimizers (registry `optimizer`): a builder takes the model (its trainable parameters) and the device as runtime
context. `layer_decay` (layer-wise LR decay, LLRD) scales each backbone block's learning rate by layer_decay ** depth
from the top, with timm's `param_groups_layer_decay` (the blocks come from the timm model's `group_matcher`); the
pooling, fusion and head train at the full rate."""
from __future__ import annotations

import torch
from torch import nn

from biomass.errors import ConfigError
from biomass.registry import OPTIMIZERS


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """The trainable parameters as optimizer groups: one group, or one per backbone depth with `layer_decay`
    (each group's `lr` already scaled, so any torch scheduler scales it from there)."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # frozen tensors get no optimizer state
    if layer_decay is None:
        return [{"params": trainable}]
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay must be within (0, 1], got {layer_decay}")
    timm_model = getattr(getattr(model, "backbone", None), "model", None)
    if timm_model is None or not hasattr(timm_model, "group_matcher"):
        raise ConfigError("optim.layer_decay needs a timm backbone (model.backbone.model with group_matcher)")
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(timm_model, weight_decay=weight_decay, layer_decay=layer_decay,
                                      weight_decay_exclude_1d=False)
    in_backbone = {id(p) for p in timm_model.parameters()}
    rest = [p for p in trainable if id(p) not in in_backbone]
    out = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": lr * g["lr_scale"],
            "lr_scale": g["lr_scale"]} for g in groups if g["params"]]
    if rest:
        out.append({"params": rest, "weight_decay": weight_decay, "lr": lr, "lr_scale": 1.0})
    return out


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, device: torch.device, /, *, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool | None = None,
          layer_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW (the seed's); `fused: null` uses the fused kernel where the device supports it (CUDA);
    `layer_decay`: layer-wise LR decay over the backbone's blocks (timm param groups)."""
    fused = fused if fused is not None else device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, layer_decay), lr=lr, weight_decay=weight_decay,
                             betas=betas, eps=eps, fused=fused or None)


@OPTIMIZERS.register("sgd")
def sgd(model: nn.Module, device: torch.device, /, *, lr: float, weight_decay: float = 0.0,
        momentum: float = 0.9, nesterov: bool = True, layer_decay: float | None = None) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum; `layer_decay` as for adamw."""
    return torch.optim.SGD(param_groups(model, lr, weight_decay, layer_decay), lr=lr, weight_decay=weight_decay,
                           momentum=momentum, nesterov=nesterov)
