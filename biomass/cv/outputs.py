"""What a finished CV run reports: metrics.json, the OOF CSVs, scatter plots, MLflow metrics, the summary table.

The deployable CV runs the chain (biomass.chain) on the training images out of fold: every image gets NDVI and
Height from the aux models that never saw it and its biomass from the main models that never saw it, framed, TTA'd
and post-processed exactly as the test images will be.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomass.chain import ChainSettings, held_out, run_chain
from biomass.config.schema import ExperimentConfig
from biomass.constants import SHORT, TABULAR, TARGETS, sample_id
from biomass.data.source import TrainData
from biomass.engine.checkpoint import write_json
from biomass.engine.loop import FoldResult
from biomass.metrics import score_report, scored_rows
from biomass.rundir import AUX_OOF, CONFIG, FOLDS, METRICS, OOF, OOF_DEPLOYABLE, PLOTS, RunDir
from biomass.stages import AUX, MAIN, Stage
from biomass.tracking import Tracker, scatter_plot
from biomass.ttt import labelled_from


def long_format(image_ids: pd.Series, values: np.ndarray, names=TARGETS) -> pd.DataFrame:
    """Wide (n_images, n_targets) -> Kaggle's long `sample_id,target`."""
    rows = [(sample_id(i, t), float(values[r, j])) for r, i in enumerate(image_ids) for j, t in enumerate(names)]
    return pd.DataFrame(rows, columns=["sample_id", "target"])


def chain_is_leaky(cfg: ExperimentConfig, main_folds: np.ndarray, aux_folds: np.ndarray | None) -> str | None:
    """Why the deployable CV cannot be leak-free, or None."""
    if cfg.aux is None or cfg.aux.init_from is None:
        return None
    if cfg.aux.init_from == "main/fold0":
        return ("aux folds start from the main fold-0 model, which trained on most images the aux folds validate "
                "on; use aux.init_from=main/same_fold with the main stage's fold splitter for a leak-free CV")
    if not np.array_equal(main_folds, aux_folds):
        return ("aux.init_from=main/same_fold with aux folds that differ from the main folds lets an aux fold "
                "start from a main model that trained on its validation images; give both stages the same splitter")
    return None


def chain_runs(cfg: ExperimentConfig, main_uses_tabular: bool) -> bool:
    """Whether the deployable chain can run: an aux stage predicts NDVI/Height, or the main head ignores them."""
    return cfg.aux is not None or not main_uses_tabular


def deployable_predictions(accelerator, cfg: ExperimentConfig, data: TrainData, run: RunDir,
                           fold_ids: dict[Stage, np.ndarray], folds: dict[Stage, list[int]]) -> np.ndarray:
    """The chain out of fold: biomass (n, 5) in grams, NaN where no fold held a row out. With `infer.ttt` each main
    fold fine-tunes on its training images + its held-out images pseudo-labelled, as it would on the test set."""
    aux = held_out(fold_ids[AUX], folds[AUX]) if cfg.aux is not None else None
    labelled = labelled_from(cfg, data, fold_ids[MAIN], folds[MAIN]) if cfg.infer.ttt is not None else None
    return run_chain(accelerator, run, cfg, data.images, aux, held_out(fold_ids[MAIN], folds[MAIN]),
                     labelled=labelled)[0]


def compute_metrics(accelerator, cfg: ExperimentConfig, data: TrainData, run: RunDir,
                    fold_ids: dict[Stage, np.ndarray], folds: dict[Stage, list[int]], main_oof: np.ndarray,
                    results: dict[Stage, list[FoldResult]], aux_oof: np.ndarray | None, main_uses_tabular: bool
                    ) -> tuple[dict[str, Any], np.ndarray | None]:
    y = data.table[list(TARGETS)].to_numpy(np.float64)
    # the rows the trained folds held out, every one finite (else one error naming the fold): never a score on none
    scored = scored_rows(main_oof, held_out(fold_ids[MAIN], folds[MAIN]), f"{run}: main out-of-fold")
    report = score_report(y[scored], main_oof[scored])
    metrics: dict[str, Any] = {"cv/weighted_r2": report["weighted_r2"], "cv/mean_target_r2": report["mean_target_r2"],
                               **{f"cv/{t}_r2": v for t, v in report["per_target"].items()},
                               "cv/images_scored": len(scored)}
    metrics["folds"] = {stage.name: {str(r.fold): {"best_epoch": r.best_epoch, **r.best} for r in rs}
                        for stage, rs in results.items()}
    if aux_oof is not None:
        ok = scored_rows(aux_oof, held_out(fold_ids[AUX], folds[AUX]), f"{run}: aux out-of-fold")
        t = data.table[list(TABULAR)].to_numpy(np.float64)
        aux = AUX.score(t[ok], aux_oof[ok])
        metrics.update({f"cv/aux_{n}_r2": aux[f"r2/{n}"] for n in TABULAR})
    if not chain_runs(cfg, main_uses_tabular):
        return metrics, None
    deployable = deployable_predictions(accelerator, cfg, data, run, fold_ids, folds)
    aux_rows = np.concatenate(list(held_out(fold_ids[AUX], folds[AUX]).values())) if cfg.aux is not None else None
    chained = {k: rows if aux_rows is None else np.intersect1d(rows, aux_rows)
               for k, rows in held_out(fold_ids[MAIN], folds[MAIN]).items()}
    ok = scored_rows(deployable, chained, f"{run}: deployable chain, main")
    metrics["cv/weighted_r2_deployable"] = score_report(y[ok], deployable[ok])["weighted_r2"]
    metrics["cv/deployable_images_scored"] = len(ok)
    metrics["cv/deployable_chain"] = repr(ChainSettings.of(cfg))
    leak = chain_is_leaky(cfg, fold_ids[MAIN], fold_ids.get(AUX))
    metrics["cv/deployable_leak"] = leak is not None
    if leak:
        metrics["cv/deployable_leak_reason"] = leak
        if accelerator.is_main_process:
            warnings.warn(f"the deployable CV is optimistic: {leak}", stacklevel=1)
            accelerator.print(f"warning: the deployable CV is optimistic: {leak}")
    return metrics, deployable


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False, float_format="%.6f")
    os.replace(tmp, path)


def write_outputs(cfg: ExperimentConfig, data: TrainData, run: RunDir, main_oof: np.ndarray,
                  aux_oof: np.ndarray | None, deployable: np.ndarray | None, metrics: dict[str, Any],
                  tracker: Tracker) -> None:
    ids = data.table["image_id"]
    y = data.table[list(TARGETS)].to_numpy(np.float64)
    scored = ~np.isnan(main_oof).any(axis=1)
    _atomic_csv(long_format(ids[scored], main_oof[scored]), run / OOF)
    plots = [scatter_plot(y[scored], main_oof[scored], TARGETS, run / PLOTS / "oof_scatter.png",
                          f"{cfg.name}: out-of-fold, true NDVI/Height")]
    if aux_oof is not None:
        ok = ~np.isnan(aux_oof).any(axis=1)
        _atomic_csv(pd.DataFrame({"image_id": ids[ok], **{n: aux_oof[ok, j] for j, n in enumerate(TABULAR)}}),
                    run / AUX_OOF)
        t = data.table[list(TABULAR)].to_numpy(np.float64)
        plots.append(scatter_plot(t[ok], aux_oof[ok], TABULAR, run / PLOTS / "aux_oof_scatter.png",
                                  f"{cfg.name}: aux stage, out-of-fold"))
    if deployable is not None:
        ok = ~np.isnan(deployable).any(axis=1)
        _atomic_csv(long_format(ids[ok], deployable[ok]), run / OOF_DEPLOYABLE)
        plots.append(scatter_plot(y[ok], deployable[ok], TARGETS, run / PLOTS / "oof_deployable_scatter.png",
                                  f"{cfg.name}: out-of-fold through the inference chain"))
    write_json(run / METRICS, metrics)
    tracker.metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name in (CONFIG, FOLDS, OOF, OOF_DEPLOYABLE, AUX_OOF, METRICS):
        tracker.artifact(run / name)
    for p in plots:
        tracker.artifact(p, "plots")


def summary_table(console, metrics: dict[str, Any], results: dict[Stage, list[FoldResult]]) -> None:
    from rich.table import Table

    table = Table(title="cross-validation R² (out-of-fold, original units)")
    table.add_column("stage / fold")
    table.add_column("epoch", justify="right")
    table.add_column("score", justify="right")
    names = list(TARGETS) + list(TABULAR)
    for n in names:  # short headers keep the table readable in an 80-column terminal
        table.add_column(SHORT.get(n, n), justify="right")
    for stage, stage_results in results.items():
        for r in stage_results:
            cells = [f"{r.best.get(f'r2/{n}', float('nan')):.3f}" if f"r2/{n}" in r.best else "" for n in names]
            table.add_row(f"{stage.name} fold {r.fold}", str(r.best_epoch), f"{r.best['score']:.4f}", *cells)
    cells = [f"{metrics[f'cv/{n}_r2']:.3f}" if f"cv/{n}_r2" in metrics else "" for n in TARGETS]
    table.add_row("[bold]CV", "", f"[bold]{metrics['cv/weighted_r2']:.4f}", *cells, *[""] * len(TABULAR))
    if "cv/weighted_r2_deployable" in metrics:
        cells = [f"{metrics[f'cv/aux_{n}_r2']:.3f}" if f"cv/aux_{n}_r2" in metrics else "" for n in TABULAR]
        table.add_row("[bold]CV deployable", "", f"[bold]{metrics['cv/weighted_r2_deployable']:.4f}",
                      *[""] * len(TARGETS), *cells)
    console.print(table)
