"""Post-processing steps (registry `post-processing`): grams (n, 5) in TARGETS order -> grams (n, 5).

`infer.post` lists them (`[mass_balance, {clover_scale: 0.8}, {zero_below: 0.2}]`); `biomass.chain.postprocess` runs
them, so the deployable CV and the submission apply exactly the same steps.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from biomass.constants import TARGET_WEIGHTS, TARGETS
from biomass.errors import ConfigError
from biomass.registry import POSTS

Step = Callable[[np.ndarray], np.ndarray]
# The knobs' ranges, checked when the config is validated (as infer.ttt.blend is): a blend weight outside [0, 1]
# extrapolates, a scale <= 0 flips or erases a target, a negative threshold zeroes nothing and reads as a typo.
Weight = Annotated[float, Field(ge=0.0, le=1.0)]
Scale = Annotated[float, Field(gt=0.0)]
Grams = Annotated[float, Field(ge=0.0)]
Target = Literal[TARGETS]  # a target name, checked with the config (not after training, when the chain first runs)
GREEN, DEAD, CLOVER, GDM, TOTAL = range(5)


def project_mass_balance(pred: np.ndarray, weights=TARGET_WEIGHTS) -> np.ndarray:
    """Nearest predictions (in the metric's weighted norm) with GDM = Green + Clover, Total = Green + Dead + Clover."""
    a = np.array([[1, 0, 1, -1, 0], [1, 1, 1, 0, -1]], dtype=np.float64)  # rows: constraints on TARGETS order
    w_inv = np.diag(1.0 / np.asarray(weights))
    correction = w_inv @ a.T @ np.linalg.solve(a @ w_inv @ a.T, a @ pred.T)
    return pred - correction.T


def _columns(targets: tuple[str, ...], key: str) -> list[int]:
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ConfigError(f"infer.post {key}: unknown target {bad[0]!r}; choose from {', '.join(TARGETS)}")
    return [TARGETS.index(t) for t in targets]


@POSTS.register("mass_balance")
def mass_balance() -> Step:
    """Project onto GDM = Green + Clover, Total = GDM + Dead (weighted least squares; the writeup's identities)."""
    return project_mass_balance


@POSTS.register("clover_scale")
def clover_scale(*, factor: Scale = 0.8, rebalance: bool = True) -> Step:
    """Clover x factor (1st and 8th places: x0.8); with `rebalance`, GDM and Total drop by the clover removed."""

    def step(pred: np.ndarray) -> np.ndarray:
        out = pred.copy()
        removed = out[:, CLOVER] * (1.0 - factor)
        out[:, CLOVER] -= removed
        if rebalance:
            out[:, GDM] -= removed
            out[:, TOTAL] -= removed
        return out

    return step


@POSTS.register("zero_below")
def zero_below(*, threshold: Grams = 0.2, targets: tuple[Target, ...] = ("Dry_Clover_g", "Dry_Dead_g")) -> Step:
    """Predictions under `threshold` grams set to 0 in the given targets (8th place (a): < 0.2 zeroed)."""
    cols = _columns(tuple(targets), "zero_below.targets")

    def step(pred: np.ndarray) -> np.ndarray:
        out = pred.copy()
        sub = out[:, cols]
        out[:, cols] = np.where(sub < threshold, 0.0, sub)
        return out

    return step


@POSTS.register("blend_sums")
def blend_sums(*, weight: Weight = 0.5) -> Step:
    """GDM and Total blended with the sums of their parts: (1-w)·pred + w·sum (1st place: 50/50)."""

    def step(pred: np.ndarray) -> np.ndarray:
        out = pred.copy()
        gdm = pred[:, GREEN] + pred[:, CLOVER]
        out[:, GDM] = (1 - weight) * pred[:, GDM] + weight * gdm
        out[:, TOTAL] = (1 - weight) * pred[:, TOTAL] + weight * (gdm + pred[:, DEAD])
        return out

    return step


def shorthand(item: object) -> object:
    """`mass_balance` -> {name: mass_balance}; `{clover_scale: 0.8}` -> {name: clover_scale, factor: 0.8} (the
    builder's first argument); a full `{name: ..., ...}` node is returned as it is."""
    if isinstance(item, str):
        return {"name": item}
    if isinstance(item, dict) and "name" not in item and len(item) == 1:
        (name, value), = item.items()
        if isinstance(value, dict):
            return {"name": name, **value}
        if name in POSTS:
            params = list(POSTS.parameters(name))
            if params:
                return {"name": name, params[0]: value}
    return item
