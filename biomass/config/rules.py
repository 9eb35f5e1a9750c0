"""Rules across keys and stages, checked with the rest of validation: what the schema's per-key types cannot say,
and what would otherwise end a run mid-way or make its submission impossible."""
from __future__ import annotations

from typing import Any

from biomass.config.schema import ExperimentConfig
from biomass.errors import ConfigError
from biomass.stages import configured


def planned_folds(stage_cfg: Any) -> list[int] | None:
    """The folds a stage will train, when the config alone says (`train_folds`, or `range(n_splits)`)."""
    if stage_cfg.folds.train_folds is not None:
        return list(stage_cfg.folds.train_folds)
    n = stage_cfg.folds.splitter.get("n_splits")
    return list(range(n)) if isinstance(n, int) else None


def check_rules(cfg: ExperimentConfig) -> None:
    """Rules across keys and stages that would otherwise end a run mid-way or make its submission impossible."""
    import math

    for each in configured(cfg):
        name, stage = each.name, each.config(cfg)
        n = stage.folds.splitter.get("n_splits")
        if isinstance(n, int) and n < 2:
            raise ConfigError(f"config key '{name}.folds.splitter.n_splits': cross-validation needs at least 2 "
                              f"folds, got {n}")
        chosen = stage.folds.train_folds
        if chosen is not None:
            key = f"config key '{name}.folds.train_folds'"
            if not chosen:
                raise ConfigError(f"{key}: empty; list at least one fold, or null for all")
            if len(set(chosen)) != len(chosen):
                raise ConfigError(f"{key}: lists a fold twice ({chosen})")
            bad = [k for k in chosen if k < 0 or (isinstance(n, int) and k >= n)]
            if bad:
                raise ConfigError(f"{key}: fold {bad[0]} does not exist (folds are 0..{n - 1 if n else '?'})")
    if cfg.main.init_from is not None:
        raise ConfigError("config key 'main.init_from': only the aux stage can start from a main checkpoint")
    main_folds = planned_folds(cfg.main)
    if cfg.aux is not None and cfg.aux.init_from is not None and main_folds is not None:
        key = f"config key 'aux.init_from' ({cfg.aux.init_from})"
        if cfg.aux.init_from == "main/fold0" and 0 not in main_folds:
            raise ConfigError(f"{key}: needs main fold 0, which main.folds.train_folds={main_folds} does not train")
        aux_folds = planned_folds(cfg.aux)
        if cfg.aux.init_from == "main/same_fold" and aux_folds is not None:
            missing = [k for k in aux_folds if k not in main_folds]
            if missing:
                raise ConfigError(f"{key}: aux fold {missing[0]} needs main fold {missing[0]}, which the main stage "
                                  f"does not train (main folds {main_folds}, aux folds {aux_folds})")
    weights = cfg.infer.fold_weights
    if isinstance(weights, list):
        key = "config key 'infer.fold_weights'"
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"{key}: weights must be finite, non-negative and sum above 0, got {weights}")
        if main_folds is not None and len(weights) != len(main_folds):
            raise ConfigError(f"{key}: {len(weights)} weights for the {len(main_folds)} main folds the run trains "
                              f"({main_folds}); give one per fold")
