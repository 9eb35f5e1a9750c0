"""Fold splitters (registry `fold splitter`): a builder returns a function table -> fold id per image."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold

from biomass.errors import ConfigError
from biomass.registry import SPLITTERS

Splitter = Callable[[pd.DataFrame], np.ndarray]
GROUP_COLUMNS = ("State", "Sampling_Date", "Species")


def _assign(n: int, splits) -> np.ndarray:
    folds = np.full(n, -1, dtype=np.int64)
    for k, (_, val) in enumerate(splits):
        folds[val] = k
    return folds


@SPLITTERS.register("kfold")
def kfold(*, n_splits: int = 5, seed: int = 42, shuffle: bool = True) -> Splitter:
    """Shuffled KFold over images in file order (the seed's split: KFold(5, shuffle=True, random_state=42))."""

    def split(table: pd.DataFrame) -> np.ndarray:
        if len(table) < n_splits:
            raise ConfigError(f"kfold: {n_splits} folds need at least {n_splits} images, the data has {len(table)}")
        kf = KFold(n_splits=n_splits, shuffle=shuffle, random_state=seed if shuffle else None)
        return _assign(len(table), kf.split(np.zeros(len(table))))

    return split


@SPLITTERS.register("grouped")
def grouped(*, n_splits: int = 5, by: tuple[str, ...] = ("State", "Sampling_Date"), stratify: str | None = None,
            seed: int = 42) -> Splitter:
    """Images of one group (State, Sampling_Date, or their combination) never straddle train and validation.

    With `stratify` (e.g. State while grouping by date) sklearn's StratifiedGroupKFold balances that column.
    """
    for col in (*by, *([stratify] if stratify else [])):
        if col not in GROUP_COLUMNS:
            raise ConfigError(f"grouped splitter: cannot group by {col!r}; choose from {', '.join(GROUP_COLUMNS)}")
    if not by:
        raise ConfigError("grouped splitter: `by` needs at least one column")

    def split(table: pd.DataFrame) -> np.ndarray:
        groups = table[list(by)].astype(str).agg("|".join, axis=1).to_numpy()
        n_groups = len(set(groups))
        if n_groups < n_splits:
            raise ConfigError(f"grouped splitter: {n_splits} folds need at least {n_splits} groups of "
                              f"{'+'.join(by)}, the data has {n_groups}")
        x = np.zeros(len(table))
        if stratify:
            cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            return _assign(len(table), cv.split(x, table[stratify].astype(str), groups))
        cv = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return _assign(len(table), cv.split(x, groups=groups))

    return split


def fold_balance(folds: np.ndarray, bins: np.ndarray, n_splits: int) -> float:
    """How unequal the folds are: the largest absolute gap between a fold's share of a target bin and that bin's
    share overall, plus the largest relative gap of a fold's size from n/k. 0 is perfect."""
    n_bins = int(bins.max()) + 1
    overall = np.bincount(bins, minlength=n_bins) / len(bins)
    gaps, sizes = [], []
    for k in range(n_splits):
        member = bins[folds == k]
        sizes.append(len(member))
        if len(member):
            gaps.append(np.abs(np.bincount(member, minlength=n_bins) / len(member) - overall).max())
    size_gap = np.abs(np.asarray(sizes) / (len(bins) / n_splits) - 1).max()
    return float(max(gaps) + size_gap)


@SPLITTERS.register("stratified_group")
def stratified_group(*, n_splits: int = 5, by: tuple[str, ...] = ("State", "Sampling_Date"),
                     target: str = "Dry_Total_g", bins: int = 5, seed: int = 42, search: int = 50) -> Splitter:
    """Groups (Sampling_Date + State) never straddle folds; folds stratified by quantile bins of `target`; the most
    balanced of `search` seeds (seed, seed+1, ...) is kept and its balance printed (8th and 9th places)."""
    for col in by:
        if col not in GROUP_COLUMNS:
            raise ConfigError(f"stratified_group splitter: cannot group by {col!r}; choose from "
                              f"{', '.join(GROUP_COLUMNS)}")
    if search < 1 or bins < 2:
        raise ConfigError("stratified_group splitter: search must be >= 1 and bins >= 2")

    def split(table: pd.DataFrame) -> np.ndarray:
        if target not in table.columns:
            raise ConfigError(f"stratified_group splitter: the training table has no column {target!r}")
        groups = table[list(by)].astype(str).agg("|".join, axis=1).to_numpy()
        if len(set(groups)) < n_splits:
            raise ConfigError(f"stratified_group splitter: {n_splits} folds need at least {n_splits} groups of "
                              f"{'+'.join(by)}, the data has {len(set(groups))}")
        y = table[target].to_numpy(np.float64)
        edges = np.quantile(y, np.arange(1, bins) / bins)
        labels = np.searchsorted(edges, y, side="right")
        best, best_score, best_seed = None, np.inf, seed
        for s in range(seed, seed + search):
            cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=s)
            folds = _assign(len(table), cv.split(np.zeros(len(table)), labels, groups))
            score = fold_balance(folds, labels, n_splits)
            if score < best_score:
                best, best_score, best_seed = folds, score, s
        sizes = np.bincount(best, minlength=n_splits).tolist()
        print(f"stratified_group: seed {best_seed} of {seed}..{seed + search - 1}, balance {best_score:.4f} "
              f"(max bin-share gap + max size gap; 0 = perfect), fold sizes {sizes}")
        return best

    return split
