"""LR schedulers (registry `scheduler`), stepped once per epoch; `plateau` is stepped with the validation loss.

Builders take the optimizer and the stage's epoch count as runtime context, so a schedule that spans the run
(`cosine`) follows `train.epochs` instead of repeating it in its own config."""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    LRScheduler,
    ReduceLROnPlateau,
)

from biomass.registry import SCHEDULERS


@SCHEDULERS.register("cosine_warm_restarts")
def cosine_warm_restarts(optimizer: Optimizer, epochs: int, /, *,
                         T_0: int = 10, T_mult: int = 2,  # noqa: N803 - torch's names
                         eta_min: float = 1e-6) -> LRScheduler:
    """CosineAnnealingWarmRestarts, stepped per epoch (the seed's stage 1: 10, 2, 1e-6)."""
    return CosineAnnealingWarmRestarts(optimizer, T_0=T_0, T_mult=T_mult, eta_min=eta_min)


@SCHEDULERS.register("cosine")
def cosine(optimizer: Optimizer, epochs: int, /, *, eta_min: float = 0.0) -> LRScheduler:
    """One cosine decay from the optimizer's lr to eta_min over the stage's epochs (CosineAnnealingLR)."""
    return CosineAnnealingLR(optimizer, T_max=epochs, eta_min=eta_min)


@SCHEDULERS.register("plateau")
def plateau(optimizer: Optimizer, epochs: int, /, *, factor: float = 0.5, patience: int = 4,
            min_lr: float = 0.0) -> ReduceLROnPlateau:
    """ReduceLROnPlateau on the validation loss (the seed's stage 2: factor .5, patience 4)."""
    return ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience, min_lr=min_lr)


@SCHEDULERS.register("constant")
def constant(optimizer: Optimizer, epochs: int, /) -> LRScheduler:
    """No schedule."""
    return ConstantLR(optimizer, factor=1.0, total_iters=0)
