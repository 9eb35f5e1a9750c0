"""What a finished CV run reports: its metrics (computed here from predictions, nothing else), metrics.json, the
OOF CSVs, scatter plots, MLflow metrics, the summary table.

The deployable predictions come from the chain (biomass.chain, run by biomass.cv.experiment) on the training images
out of fold: every image gets NDVI and Height from the aux models that never saw it and its biomass from the main
models that never saw it, framed, TTA'd and post-processed exactly as the test images will be.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomass.chain import Assignment, ChainSettings
from biomass.config.schema import ExperimentConfig
from biomass.constants import SHORT, TABULAR, TARGETS, sample_id
from biomass.data.source import TrainData
from biomass.engine.loop import FoldResult
from biomass.metrics import score_report, scored_rows
from biomass.places import write_csv_atomic, write_json
from biomass.rundir import AUX_OOF, CONFIG, FOLDS, METRICS, OOF, OOF_DEPLOYABLE, PLOTS, RunDir
from biomass.stages import AUX, MAIN, Stage
from biomass.tracking import Tracker

CSV = {"index": False, "float_format": "%.6f"}


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


@dataclass
class OutOfFold:
    """A CV run's predictions for its training images, NaN where no fold held a row out: the main stage's (true
    NDVI/Height in), the aux stage's NDVI/Height, and the deployable chain's biomass (None: not run). `held`: the
    rows each trained fold held out, every one of which must be scored (a NaN there is an error naming `where`, the
    run, and the fold: never a score on fewer rows, or on none)."""

    where: str
    held: Assignment
    main: np.ndarray
    aux: np.ndarray | None = None
    deployable: np.ndarray | None = None


def cv_metrics(data: TrainData, oof: OutOfFold, results: dict[Stage, list[FoldResult]]) -> dict[str, Any]:
    """The oracle CV (main OOF), the aux stage's R², each fold's best epoch and scores."""
    y = data.table[list(TARGETS)].to_numpy(np.float64)
    scored = scored_rows(oof.main, oof.held.main, f"{oof.where}: main out-of-fold")
    report = score_report(y[scored], oof.main[scored])
    metrics: dict[str, Any] = {"cv/weighted_r2": report["weighted_r2"], "cv/mean_target_r2": report["mean_target_r2"],
                               **{f"cv/{t}_r2": v for t, v in report["per_target"].items()},
                               "cv/images_scored": len(scored)}
    metrics["folds"] = {stage.name: {str(r.fold): {"best_epoch": r.best_epoch, **r.best} for r in rs}
                        for stage, rs in results.items()}
    if oof.aux is not None:
        ok = scored_rows(oof.aux, oof.held.aux, f"{oof.where}: aux out-of-fold")
        t = data.table[list(TABULAR)].to_numpy(np.float64)
        aux = AUX.score(t[ok], oof.aux[ok])
        metrics.update({f"cv/aux_{n}_r2": aux[f"r2/{n}"] for n in TABULAR})
    return metrics


def deployable_metrics(cfg: ExperimentConfig, data: TrainData, oof: OutOfFold,
                       fold_ids: dict[Stage, np.ndarray]) -> dict[str, Any]:
    """The deployable CV's score (every row both stages held out), the chain it ran, and whether it can be
    leak-free (`cv/deployable_leak`)."""
    y = data.table[list(TARGETS)].to_numpy(np.float64)
    aux_rows = np.concatenate(list(oof.held.aux.values())) if oof.held.aux is not None else None
    chained = {k: rows if aux_rows is None else np.intersect1d(rows, aux_rows) for k, rows in oof.held.main.items()}
    ok = scored_rows(oof.deployable, chained, f"{oof.where}: deployable chain, main")
    metrics: dict[str, Any] = {"cv/weighted_r2_deployable": score_report(y[ok], oof.deployable[ok])["weighted_r2"],
                               "cv/deployable_images_scored": len(ok),
                               "cv/deployable_chain": repr(ChainSettings.of(cfg))}
    leak = chain_is_leaky(cfg, fold_ids[MAIN], fold_ids.get(AUX))
    metrics["cv/deployable_leak"] = leak is not None
    if leak:
        metrics["cv/deployable_leak_reason"] = leak
    return metrics


def write_outputs(cfg: ExperimentConfig, data: TrainData, run: RunDir, oof: OutOfFold, metrics: dict[str, Any],
                  tracker: Tracker) -> None:
    ids = data.table["image_id"]
    y = data.table[list(TARGETS)].to_numpy(np.float64)
    scored = ~np.isnan(oof.main).any(axis=1)
    write_csv_atomic(long_format(ids[scored], oof.main[scored]), run / OOF, **CSV)
    plots = [scatter_plot(y[scored], oof.main[scored], TARGETS, run / PLOTS / "oof_scatter.png",
                          f"{cfg.name}: out-of-fold, true NDVI/Height")]
    if oof.aux is not None:
        ok = scored_rows(oof.aux, oof.held.aux, f"{oof.where}: aux out-of-fold")
        write_csv_atomic(pd.DataFrame({"image_id": ids[ok], **{n: oof.aux[ok, j] for j, n in enumerate(TABULAR)}}),
                         run / AUX_OOF, **CSV)
        t = data.table[list(TABULAR)].to_numpy(np.float64)
        plots.append(scatter_plot(t[ok], oof.aux[ok], TABULAR, run / PLOTS / "aux_oof_scatter.png",
                                  f"{cfg.name}: aux stage, out-of-fold"))
    if oof.deployable is not None:
        ok = ~np.isnan(oof.deployable).any(axis=1)
        write_csv_atomic(long_format(ids[ok], oof.deployable[ok]), run / OOF_DEPLOYABLE, **CSV)
        plots.append(scatter_plot(y[ok], oof.deployable[ok], TARGETS, run / PLOTS / "oof_deployable_scatter.png",
                                  f"{cfg.name}: out-of-fold through the inference chain"))
    write_json(run / METRICS, metrics)
    tracker.metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name in (CONFIG, FOLDS, OOF, OOF_DEPLOYABLE, AUX_OOF, METRICS):
        tracker.artifact(run / name)
    for p in plots:
        tracker.artifact(p, "plots")


def scatter_plot(y_true, y_pred, names, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2))
    for j, (ax, name) in enumerate(zip(np.atleast_1d(axes), names)):
        y, p = y_true[:, j], y_pred[:, j]
        ok = ~np.isnan(p)
        ax.scatter(y[ok], p[ok], s=8, alpha=0.6)
        hi = float(max(y[ok].max(initial=1), p[ok].max(initial=1)))
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("true (g)")
        ax.set_ylabel("predicted (g)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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
