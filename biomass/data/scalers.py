"""Per-fold standardisation of targets and tabular inputs, stored as plain arrays (JSON), never pickles.

One implementation serves numpy arrays (training, CV) and torch tensors (the model's target space, inference):
`standardise` and `unstandardise` pick the array library from their input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler


def _like(values: Any, a: Any) -> Any:
    if isinstance(values, torch.Tensor):
        return torch.as_tensor(a, dtype=values.dtype if values.is_floating_point() else torch.float32,
                               device=values.device)
    return np.asarray(a, dtype=np.float64)


def standardise(values: Any, mean: Any, scale: Any, log1p: bool) -> Any:
    """(f(x) - mean) / scale, f = log1p or identity; numpy in, numpy out; tensor in, tensor out."""
    if isinstance(values, torch.Tensor):
        x = torch.log1p(values) if log1p else values
    else:
        x = np.log1p(values) if log1p else np.asarray(values, dtype=np.float64)
    return (x - _like(x, mean)) / _like(x, scale)


def unstandardise(values: Any, mean: Any, scale: Any, log1p: bool) -> Any:
    """The inverse of `standardise`."""
    if not isinstance(values, torch.Tensor):
        values = np.asarray(values, dtype=np.float64)
    x = values * _like(values, scale) + _like(values, mean)
    if log1p:
        return torch.expm1(x) if isinstance(x, torch.Tensor) else np.expm1(x)
    return x


@dataclass(frozen=True)
class Scaler:
    """x -> (f(x) - mean) / scale, f = identity or log1p. Fitted on one fold's training images."""

    mean: np.ndarray
    scale: np.ndarray
    log1p: bool = False

    @classmethod
    def fit(cls, values: np.ndarray, log1p: bool = False) -> Scaler:
        x = np.log1p(values) if log1p else np.asarray(values, dtype=np.float64)
        sk = StandardScaler().fit(x)  # population std (ddof=0), as the seed's StandardScaler
        return cls(sk.mean_.astype(np.float64), sk.scale_.astype(np.float64), log1p)

    def transform(self, values: Any) -> Any:
        return standardise(values, self.mean, self.scale, self.log1p)

    def inverse(self, values: Any) -> Any:
        return unstandardise(values, self.mean, self.scale, self.log1p)

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "log1p": self.log1p}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Scaler:
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64),
                   bool(d.get("log1p", False)))
