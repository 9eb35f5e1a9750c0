"""The competition metric, used by training, CV, ablations, inference and `biomass.score`.

R2_w = 1 - sum w_j (y_j - p_j)^2 / sum w_j (y_j - ybar_w)^2 over all (image, target) rows together, each row weighted
by its target (.1 .1 .1 .2 .5), with ybar_w = sum w_j y_j / sum w_j one weighted mean over all rows.

No score on nothing: zero rows, or a NaN/inf anywhere, is a `NotScorable` error, never a number (the weighted R²
of zero rows would be 1.0). Callers that know the run, stage and fold check first with `require_finite` or
`scored_rows`, so that the one line a user sees names them.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from biomass.constants import TARGET_WEIGHTS, TARGETS
from biomass.errors import BiomassError


class NotScorable(BiomassError):
    """Predictions that cannot be scored: none, or some not finite (a diverged training, a damaged file)."""


def require_finite(pred: np.ndarray, who: str) -> None:
    """Raise NotScorable naming `who` (run, stage, fold) and how many of the predictions (rows) are not finite."""
    rows = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)
    bad = ~np.isfinite(rows).all(axis=1)
    if len(rows) == 0:
        raise NotScorable(f"{who}: no predictions to score")
    if bad.any():
        raise NotScorable(f"{who}: {int(bad.sum())} of {len(rows)} predictions are not finite (NaN or inf), e.g. "
                          f"{rows[np.flatnonzero(bad)[0]].tolist()}; no score (the training diverged or a file is "
                          "damaged: lower the learning rate or retrain)")


def scored_rows(pred: np.ndarray, fold_rows: Mapping[int, np.ndarray], who: str) -> np.ndarray:
    """Indices of the rows the folds predicted (each fold's held-out rows), after checking that every one of them is
    finite (require_finite, naming `who` and the fold) and that there is at least one."""
    for fold, rows in fold_rows.items():
        if len(rows):
            require_finite(np.asarray(pred)[rows], f"{who} fold {fold}")
    rows = np.sort(np.concatenate([np.asarray(r, dtype=np.int64) for r in fold_rows.values()] or [np.zeros(0, int)]))
    if len(rows) == 0:
        raise NotScorable(f"{who}: no fold predicted any image; nothing to score")
    return rows


def r2_weighted_rows(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> float:
    """R2 over flat rows with per-row weights and one weighted mean (sklearn's r2_score with sample_weight)."""
    y, p, w = (np.asarray(a, dtype=np.float64).ravel() for a in (y_true, y_pred, weights))
    if not (y.shape == p.shape == w.shape):
        raise ValueError(f"shape mismatch: y_true {y.shape}, y_pred {p.shape}, weights {w.shape}")
    if len(y) == 0:
        raise NotScorable("no rows to score")
    for name, a in (("true values", y), ("predictions", p), ("weights", w)):
        if not np.isfinite(a).all():
            raise NotScorable(f"{int((~np.isfinite(a)).sum())} of {len(a)} {name} are not finite (NaN or inf); "
                              "no score")
    mean = np.sum(w * y) / np.sum(w)
    ss_tot = np.sum(w * (y - mean) ** 2)
    ss_res = np.sum(w * (y - p) ** 2)
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0
    return float(1.0 - ss_res / ss_tot)


def weighted_r2(y_true: np.ndarray, y_pred: np.ndarray, weights: tuple[float, ...] = TARGET_WEIGHTS) -> float:
    """The competition score for wide arrays (n_images, n_targets), columns in TARGETS order."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape or y.shape[1] != len(weights):
        raise ValueError(f"expected two (n, {len(weights)}) arrays, got {y.shape} and {p.shape}")
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), y.shape)
    return r2_weighted_rows(y, p, w)


def per_target_r2(y_true: np.ndarray, y_pred: np.ndarray, names: tuple[str, ...] = TARGETS) -> dict[str, float]:
    """Ordinary R2 of each column (each with its own mean)."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    ones = np.ones(len(y))
    return {name: r2_weighted_rows(y[:, j], p[:, j], ones) for j, name in enumerate(names)}


def score_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, object]:
    """Global weighted R2 (the one to select on), per-target R2 and their mean."""
    per = per_target_r2(y_true, y_pred)
    return {"weighted_r2": weighted_r2(y_true, y_pred), "mean_target_r2": float(np.mean(list(per.values()))),
            "per_target": per}
