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
