"""Per-fold standardisation of targets and tabular inputs, stored as plain arrays (JSON), never pickles."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.preprocessing import StandardScaler


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

    def transform(self, values: np.ndarray) -> np.ndarray:
        x = np.log1p(values) if self.log1p else np.asarray(values, dtype=np.float64)
        return (x - self.mean) / self.scale

    def inverse(self, values: np.ndarray) -> np.ndarray:
        x = np.asarray(values, dtype=np.float64) * self.scale + self.mean
        return np.expm1(x) if self.log1p else x

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "log1p": self.log1p}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Scaler:
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64),
                   bool(d.get("log1p", False)))
