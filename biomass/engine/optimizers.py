"""Optimizers (registry `optimizer`): a builder takes the trainable parameters and the device as runtime context."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from biomass.registry import OPTIMIZERS


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable[torch.nn.Parameter], device: torch.device, /, *, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW (the seed's); `fused: null` uses the fused kernel where the device supports it (CUDA)."""
    fused = fused if fused is not None else device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused or None)


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable[torch.nn.Parameter], device: torch.device, /, *, lr: float, weight_decay: float = 0.0,
        momentum: float = 0.9, nesterov: bool = True) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum."""
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
