"""The run directory: every path in it, its format version, and checked readers for every file it holds.

    config.yaml  folds.csv  run.json  metrics.json  oof.csv  oof_deployable.csv  aux_oof.csv  plots/
    <stage>/fold<k>/best.safetensors + best.json (+ done.json once the fold is complete)
    state/<stage>/fold<k>/   resumable per-epoch state while the fold trains

Nobody else builds these paths. A file that is missing, truncated or foreign is one error naming it.
"""
from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomass.config.schema import ExperimentConfig, StageConfig
from biomass.errors import BiomassError, ConfigError
from biomass.places import read_json, require_writable, write_csv_atomic, write_json, write_text_atomic
from biomass.stages import Stage

FORMAT_VERSION = 1  # of the run directory's layout and files; biomass.infer reads only this version

STATUS = "run.json"
CONFIG = "config.yaml"
FOLDS = "folds.csv"
METRICS = "metrics.json"
OOF = "oof.csv"
OOF_DEPLOYABLE = "oof_deployable.csv"
AUX_OOF = "aux_oof.csv"
PLOTS = "plots"
STATE = "state"
# What a run writes. `--force` removes exactly these: a fold's done.json or saved state left by an earlier run would
# otherwise be taken for this run's and skip or resume that fold.
OUTPUTS = (STATUS, CONFIG, FOLDS, OOF, OOF_DEPLOYABLE, AUX_OOF, METRICS, PLOTS, "main", "aux", STATE)


def folds_to_train(cfg: StageConfig, fold_ids: np.ndarray) -> list[int]:
    """The folds a stage trains: `folds.train_folds`, or every fold of its splitter."""
    all_folds = sorted(set(np.asarray(fold_ids).tolist()))
    chosen = cfg.folds.train_folds if cfg.folds.train_folds is not None else all_folds
    bad = [k for k in chosen if k not in all_folds]
    if bad:
        raise ConfigError(f"folds.train_folds: fold {bad[0]} does not exist (folds are {all_folds})")
    return list(chosen)


def stamped_dir(parent: Path) -> Path:
    """A new directory `parent/<timestamp>[-k]`, created atomically, so that two runs started in the same second
    never share one."""
    require_writable(parent, "run folder")
    base = Path(parent) / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        path = (base if k == 1 else base.with_name(f"{base.name}-{k}")).resolve()
        try:
            path.mkdir(parents=True, exist_ok=False)  # atomic: the one that creates it owns it
            return path
        except FileExistsError:
            continue
    raise BiomassError(f"cannot find a free directory next to {base}")


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --------------------------------------------------------------------------------------------------- paths
    def fold_dir(self, stage: Stage, fold: int) -> Path:
        return self.path / stage.name / f"fold{fold}"

    def checkpoint(self, stage: Stage, fold: int) -> Path:
        return self.fold_dir(stage, fold) / "best.safetensors"

    def checkpoint_meta(self, stage: Stage, fold: int) -> Path:
        return self.fold_dir(stage, fold) / "best.json"

    def done_marker(self, stage: Stage, fold: int) -> Path:
        return self.fold_dir(stage, fold) / "done.json"

    def state_dir(self, stage: Stage, fold: int) -> Path:
        return self.path / STATE / stage.name / f"fold{fold}"

    # -------------------------------------------------------------------------------------------------- create
    @classmethod
    def create(cls, name: str, requested: Path | None, force: bool) -> RunDir:
        """A new run directory: `requested`, or `runs/<name>/<timestamp>` made unique with a suffix, so that runs
        started in the same second never share one. `force` empties only a requested directory's run outputs."""
        if requested is None:
            return cls(stamped_dir(Path("runs") / name))
        path = cls.check_place(name, requested)
        if path.exists() and any(path.iterdir()):
            if not force:
                raise BiomassError(f"run directory {path} already exists; pass --force to overwrite it, or "
                                   f"--resume {path} to continue an interrupted run")
            for item in OUTPUTS:  # only what a run writes: other files in the folder are left alone
                target = path / item
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @staticmethod
    def check_place(name: str, requested: Path | None) -> Path:
        """Where `create` will write can be written (run before any work starts): `--run-dir`, or `runs/<name>`."""
        if requested is None:
            return require_writable(Path("runs") / name, "run folder")
        return require_writable(requested, "--run-dir").resolve()

    # ------------------------------------------------------------------------------------------------- status
    def read_status(self) -> dict[str, Any]:
        return read_json(self.path / STATUS, "the run status file")

    def write_status(self, status: dict[str, Any]) -> None:
        write_json(self.path / STATUS, {**status, "format_version": FORMAT_VERSION})

    def is_run(self) -> bool:
        return (self.path / STATUS).is_file() and (self.path / CONFIG).is_file()

    def require_run(self) -> None:
        if not self.path.is_dir():
            raise BiomassError(f"run directory {self.path} does not exist")
        if not self.is_run():
            raise BiomassError(f"{self.path} is not a biomass run directory (no {STATUS} / {CONFIG})")

    # ------------------------------------------------------------------------------------------------- config
    def write_config(self, cfg: ExperimentConfig) -> None:
        from biomass.config.load import to_yaml

        write_text_atomic(self.path / CONFIG, to_yaml(cfg))

    def read_config(self) -> ExperimentConfig:
        from biomass.config.load import load_yaml, validate

        path = self.path / CONFIG
        if path.is_file() and path.stat().st_size == 0:
            raise BiomassError(f"{path}: the run's config is empty; the run directory is damaged: retrain")
        try:
            return validate(load_yaml(path))
        except ConfigError as err:
            why = "; ".join(str(err).splitlines()[:3])
            raise BiomassError(f"{path}: not a valid biomass config, truncated or foreign ({why}); the run "
                               "directory is damaged: retrain") from None

    # -------------------------------------------------------------------------------------------------- folds
    def write_folds(self, table: pd.DataFrame, fold_ids: dict[Stage, np.ndarray]) -> int:
        """Writes folds.csv; returns its row count, which run.json keeps (`folds_rows`) so that a table cut at a row
        boundary, still valid CSV, is caught by `read_folds`."""
        df = table[["image_id", "image_path"]].copy()
        for stage, ids in fold_ids.items():
            df[f"{stage.name}_fold"] = ids
        write_csv_atomic(df, self.path / FOLDS, index=False)
        return len(df)

    def read_folds(self) -> pd.DataFrame:
        path = self.path / FOLDS
        if not path.is_file():
            raise BiomassError(f"{self.path}: {FOLDS} is missing; the run directory is incomplete")
        try:
            df = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
            raise BiomassError(f"{path}: not a readable folds table ({str(err).splitlines()[0]}); "
                               "the run directory is damaged: retrain") from None
        if df.empty or "image_path" not in df.columns:
            raise BiomassError(f"{path}: empty or without an image_path column; the run directory is damaged")
        rows = self.read_status().get("folds_rows") if (self.path / STATUS).is_file() else None
        if rows is not None and len(df) != rows:
            raise BiomassError(f"{path}: {len(df)} rows, but the run wrote {rows} (truncated or edited); the run "
                               "directory is damaged: retrain")
        for col in ["image_path", *(c for c in df.columns if c.endswith("_fold"))]:
            values = df[col]
            bad = values.isna() | (False if col == "image_path" else
                                   pd.to_numeric(values, errors="coerce").pipe(lambda v: v.isna() | (v % 1 != 0)))
            if bad.any():
                raise BiomassError(f"{path}: row {int(np.flatnonzero(bad)[0]) + 2} has no valid {col!r} (truncated or "
                                   "edited); the run directory is damaged: retrain")
        return df

    def fold_ids(self, stage: Stage, df: pd.DataFrame | None = None) -> np.ndarray:
        """The stage's fold of each row of folds.csv (`df`: the table already read)."""
        df = self.read_folds() if df is None else df
        col = f"{stage.name}_fold"
        if col not in df.columns:
            raise BiomassError(f"{self.path / FOLDS}: no column {col!r}; it does not belong to this run's {CONFIG}")
        return df[col].to_numpy()

    def fold_ids_of(self, stage: Stage, image_paths: list[str]) -> np.ndarray:
        """The stage's fold of each of `image_paths` (as folds.csv names them), -1 for an image the run did not
        train on; every image the run trained on must be among them (test-time training re-reads them)."""
        df = self.read_folds()
        by_path = dict(zip(df["image_path"], self.fold_ids(stage, df)))
        missing = sorted(set(by_path) - set(image_paths))
        if missing:
            raise BiomassError(f"{self.path / FOLDS}: the run trained on {missing[0]!r}, which the data's train table "
                               f"lacks ({len(missing)} image(s)); infer.ttt fine-tunes on the run's training images: "
                               "point --data at the data it trained on")
        return np.array([by_path.get(p, -1) for p in image_paths], dtype=np.int64)

    def read_fold_result(self, stage: Stage, fold: int) -> dict[str, Any]:
        """A finished fold's done.json (its best epoch, scores and held-out predictions), checked."""
        path = self.done_marker(stage, fold)
        data = read_json(path, f"{stage.name} fold {fold} result")
        missing = [k for k in ("fold", "best_epoch", "best", "val_index", "predictions", "history") if k not in data]
        if missing or len(data.get("val_index") or []) != len(data.get("predictions") or []):
            raise BiomassError(f"{path}: {stage.name} fold {fold} result is incomplete "
                               f"({'no ' + repr(missing[0]) if missing else 'predictions do not match val_index'}); "
                               f"delete {path.parent} to retrain that fold")
        return data

    def trained_folds(self, stage: Stage, cfg: StageConfig) -> list[int]:
        return folds_to_train(cfg, self.fold_ids(stage))

    # ----------------------------------------------------------------------------------------- checkpoints
    def require_checkpoint(self, stage: Stage, fold: int) -> None:
        for f in (self.checkpoint(stage, fold), self.checkpoint_meta(stage, fold)):
            if not f.is_file():
                raise BiomassError(f"{self.path}: {stage.name} fold {fold} checkpoint is missing "
                                   f"({f.relative_to(self.path)})")

    def checkpoint_info(self, stage: Stage, fold: int) -> dict[str, Any]:
        """A fold checkpoint's metadata (scalers, epoch, scores), after checking both of its files exist."""
        self.require_checkpoint(stage, fold)
        meta = read_json(self.checkpoint_meta(stage, fold), f"{stage.name} fold {fold} checkpoint metadata")
        if "scalers" not in meta or "targets" not in meta["scalers"]:
            raise BiomassError(f"{self.checkpoint_meta(stage, fold)}: has no target scaler; the file is damaged")
        return meta

    def completed(self) -> ExperimentConfig:
        """The config of a completed run of this format, after checking every fold checkpoint it needs."""
        from biomass.stages import configured

        self.require_run()
        status = self.read_status()
        if status.get("format_version") != FORMAT_VERSION:
            raise BiomassError(f"{self.path} was written by an incompatible biomass version "
                               f"(format {status.get('format_version')}, this version reads {FORMAT_VERSION})")
        if status.get("status") != "completed":
            raise BiomassError(f"{self.path} did not complete (status: {status.get('status')}); "
                               "finish or retrain it first")
        cfg = self.read_config()
        folds = {stage: self.trained_folds(stage, stage.config(cfg)) for stage in configured(cfg)}
        for stage, ks in folds.items():  # every file present before any model is built (contents: when loaded)
            for k in ks:
                self.require_checkpoint(stage, k)
        return cfg

    def metrics(self) -> dict[str, Any]:
        return read_json(self.path / METRICS, "the run's metrics file")
