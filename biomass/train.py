"""The cross-validation run behind `biomass.run`: setup -> stages (main, aux) -> deployable CV -> save -> log.

Each stage trains its folds in turn with `engine.fit_fold`. After the aux stage, the deployable CV scores the full
chain out of fold: every train image gets NDVI/Height from an aux model that never saw it, and its biomass from
the main model that never saw it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from biomass import __version__
from biomass.config import Experiment, ExperimentConfig, StageConfig, to_yaml
from biomass.constants import TABULAR, TARGETS
from biomass.data.cache import make_reader
from biomass.engine import (STAGE_TARGETS, FoldResult, build_stage_model, fit_fold, predict_raw, stage_score,
                            write_json)
from biomass.metrics import score_report
from biomass.registry import SPLITTERS
from biomass.run import (
    STATUS_FILE,
    TrainData,
    _progress_enabled,
    elapsed,
    ensure_demo_data,
    load_train_data,
    long_format,
    new_run_dir,
)
from biomass.tracking import Tracker, git_state, scatter_plot

STAGE_SEED = {"main": 0, "aux": 1}
SHORT = {"Dry_Green_g": "Green", "Dry_Dead_g": "Dead", "Dry_Clover_g": "Clover", "GDM_g": "GDM",
         "Dry_Total_g": "Total", "Pre_GSHH_NDVI": "NDVI", "Height_Ave_cm": "Height"}


def fold_ids(stage: StageConfig, table: pd.DataFrame) -> np.ndarray:
    s = dict(stage.folds.splitter)
    return SPLITTERS.build(s.pop("name"), **s)(table)


def folds_to_train(stage: StageConfig, folds: np.ndarray) -> list[int]:
    all_folds = sorted(set(folds.tolist()))
    chosen = stage.folds.train_folds if stage.folds.train_folds is not None else all_folds
    bad = [k for k in chosen if k not in all_folds]
    if bad:
        from biomass.errors import ConfigError

        raise ConfigError(f"folds.train_folds: fold {bad[0]} does not exist (folds are {all_folds})")
    return list(chosen)


def checkpoint_path(run_dir: Path, stage_name: str, fold: int) -> Path:
    return run_dir / stage_name / f"fold{fold}" / "best.safetensors"


def backbone_state(path: Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of a fold checkpoint (the aux stage's initialisation)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def chain_is_leaky(cfg: ExperimentConfig, main_folds: np.ndarray, aux_folds: np.ndarray) -> str | None:
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


class Progress:
    """rich progress bars for stage/fold, epoch and batch; silent when not a terminal or under CI."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), transient=False)

    def __enter__(self):
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def task(self, description: str, total: int):
        if not self.enabled:
            return None
        return self.bar.add_task(description, total=total)

    def advance(self, task) -> None:
        if self.enabled and task is not None:
            self.bar.advance(task)

    def reset(self, task, description: str, total: int) -> None:
        if self.enabled and task is not None:
            self.bar.reset(task, total=total, description=description)


def fold_result_to_json(r: FoldResult) -> dict[str, Any]:
    return {"fold": r.fold, "best_epoch": r.best_epoch, "best": r.best, "val_index": r.val_index.tolist(),
            "predictions": r.predictions.tolist(), "history": r.history}


def fold_result_from_json(d: dict[str, Any]) -> FoldResult:
    return FoldResult(d["fold"], d["best_epoch"], d["best"], np.asarray(d["val_index"], dtype=np.int64),
                      np.asarray(d["predictions"], dtype=np.float64), d["history"])


def train_stage(accelerator, cfg: ExperimentConfig, stage_name: str, data: TrainData, run_dir: Path,
                folds: np.ndarray, tracker: Tracker, progress: Progress, console, children: dict[str, str],
                on_child_started) -> tuple[np.ndarray, list[FoldResult]]:
    stage: StageConfig = getattr(cfg, stage_name)
    reader = make_reader(cfg.data.cache_dir, data.root, list(data.table["image_path"]), tuple(stage.image.size),
                         data.boxes if stage.image.crop else None, data.sizes, stage.image.layout)
    names = STAGE_TARGETS[stage_name]
    oof = np.full((len(data.table), len(names)), np.nan)
    results = []
    chosen = folds_to_train(stage, folds)
    fold_task = progress.task(f"{stage_name} folds", len(chosen))
    epoch_task = progress.task("epochs", stage.train.epochs)
    batch_task = progress.task("batches", 1)
    for k in chosen:
        start = time.time()
        done = run_dir / stage_name / f"fold{k}" / "done.json"
        if done.is_file():  # resumed run: this fold finished before the interruption
            result = fold_result_from_json(json.loads(done.read_text()))
            oof[result.val_index] = result.predictions
            results.append(result)
            accelerator.print(f"{stage_name} fold {k}: already complete (best epoch {result.best_epoch})")
            progress.advance(fold_task)
            continue
        train_idx, val_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        init_state = None
        if stage_name == "aux" and stage.init_from:
            source = 0 if stage.init_from == "main/fold0" else k
            init_state = backbone_state(checkpoint_path(run_dir, "main", source))
        progress.reset(epoch_task, f"{stage_name} fold {k} epochs", stage.train.epochs)
        n_batches = max(1, len(train_idx) // stage.train.batch_size // accelerator.num_processes)

        def log(row: dict[str, float], k=k) -> None:
            score_name = "val/weighted_r2" if stage_name == "main" else "val/mean_r2"
            tracker.metrics({"train/loss": row["train/loss"], "val/loss": row["val/loss"], score_name:
                             row["val/score"], "lr": row["lr"],
                             **{f"val/{t}_r2": row[f"val/r2/{t}"] for t in names}}, step=int(row["epoch"]))
            progress.advance(epoch_task)
            progress.reset(batch_task, "batches", n_batches)
            accelerator.print(f"  {stage_name} fold {k} epoch {int(row['epoch']):>3}  train/loss {row['train/loss']:.4f}"
                              f"  val/loss {row['val/loss']:.4f}  val/score {row['val/score']:.4f}  lr {row['lr']:.2e}")

        child_key = f"{stage_name}/fold{k}"
        ctx = tracker.child(child_key, {"stage": stage_name, "fold": str(k)}, children.get(child_key)) \
            if accelerator.is_main_process else contextlib.nullcontext()
        with ctx:
            if tracker.enabled and accelerator.is_main_process:
                children[child_key] = tracker.mlflow.active_run().info.run_id
                on_child_started()
            result = fit_fold(accelerator, stage_name=stage_name, stage=stage, table=data.table, reader=reader, fold=k,
                              train_idx=train_idx, val_idx=val_idx, seed=cfg.seed * 100 + STAGE_SEED[stage_name],
                              num_workers=cfg.data.num_workers, ckpt_path=checkpoint_path(run_dir, stage_name, k),
                              init_state=init_state, log=log if accelerator.is_main_process else None,
                              progress=lambda: progress.advance(batch_task),
                              state_dir=run_dir / "state" / stage_name / f"fold{k}",
                              compile_model=cfg.runtime.compile)
            tracker.metrics({"fold/score": result.best["score"], "fold/best_epoch": result.best_epoch})
        oof[val_idx] = result.predictions
        results.append(result)
        if accelerator.is_main_process:
            write_json(done, fold_result_to_json(result))
            shutil.rmtree(run_dir / "state" / stage_name / f"fold{k}", ignore_errors=True)  # GBs for a ViT-H
        tracker.metrics({f"fold/{'weighted_r2' if stage_name == 'main' else 'aux_mean_r2'}": result.best["score"]},
                        step=k)
        accelerator.print(f"{stage_name} fold {k}: best epoch {result.best_epoch}, score {result.best['score']:.4f} "
                          f"({elapsed(start)})")
        progress.advance(fold_task)
    return oof, results


def deployable_predictions(accelerator, cfg: ExperimentConfig, data: TrainData, run_dir: Path,
                           main_folds: np.ndarray, main_results: list[FoldResult], aux_oof: np.ndarray) -> np.ndarray:
    """Main-stage OOF predictions with NDVI/Height taken from the aux OOF predictions instead of the truth."""
    from safetensors.torch import load_model

    from biomass.data.scalers import Scaler
    from biomass.engine import make_loader

    stage = cfg.main
    reader = make_reader(cfg.data.cache_dir, data.root, list(data.table["image_path"]), tuple(stage.image.size),
                         data.boxes if stage.image.crop else None, data.sizes, stage.image.layout)
    out = np.full((len(data.table), len(TARGETS)), np.nan)
    for result in main_results:
        val_idx = result.val_index[~np.isnan(aux_oof[result.val_index]).any(axis=1)]
        if len(val_idx) == 0:
            continue
        ckpt = checkpoint_path(run_dir, "main", result.fold)
        meta = json.loads(ckpt.with_suffix(".json").read_text())
        scalers = {k: Scaler.from_dict(v) for k, v in meta["scalers"].items()}
        model, loss_fn = build_stage_model("main", stage, load_weights=False)
        load_model(model, str(ckpt))
        tab = scalers["tabular"].transform(aux_oof[val_idx]).astype(np.float32)
        dummy = np.zeros((len(data.table), len(TABULAR)), np.float32)
        loader = make_loader(reader, val_idx, dummy, None, stage, 0, False, cfg.data.num_workers)
        model, loader = accelerator.prepare(model, loader)
        raw, index = predict_raw(accelerator, model, loader, tabular_override=tab)
        out[val_idx[index]] = scalers["targets"].inverse(loss_fn.point(torch.as_tensor(raw)).numpy())
        accelerator.free_memory()
    return out


def print_config_tree(console, cfg: ExperimentConfig) -> None:
    from rich.tree import Tree

    def add(node, value: Any) -> None:
        for k, v in value.items():
            if isinstance(v, dict):
                add(node.add(f"[bold]{k}"), v)
            else:
                node.add(f"{k}: {v}")

    tree = Tree(f"[bold]{cfg.name}")
    add(tree, cfg.dump())
    console.print(tree)


def summary_table(console, metrics: dict[str, Any], results: dict[str, list[FoldResult]]) -> None:
    from rich.table import Table

    table = Table(title="cross-validation R² (out-of-fold, original units)")
    table.add_column("stage / fold")
    table.add_column("epoch", justify="right")
    table.add_column("score", justify="right")
    names = list(TARGETS) + list(TABULAR)
    for n in names:  # short headers keep the table readable in an 80-column terminal
        table.add_column(SHORT.get(n, n), justify="right")
    for stage_name, stage_results in results.items():
        for r in stage_results:
            cells = [f"{r.best.get(f'r2/{n}', float('nan')):.3f}" if f"r2/{n}" in r.best else "" for n in names]
            table.add_row(f"{stage_name} fold {r.fold}", str(r.best_epoch), f"{r.best['score']:.4f}", *cells)
    cells = [f"{metrics[f'cv/{n}_r2']:.3f}" if f"cv/{n}_r2" in metrics else "" for n in TARGETS]
    table.add_row("[bold]CV", "", f"[bold]{metrics['cv/weighted_r2']:.4f}", *cells,
                  *[""] * len(TABULAR))
    if "cv/weighted_r2_deployable" in metrics:
        cells = [f"{metrics[f'cv/aux_{n}_r2']:.3f}" for n in TABULAR]
        table.add_row("[bold]CV deployable", "", f"[bold]{metrics['cv/weighted_r2_deployable']:.4f}",
                      *[""] * len(TARGETS), *cells)
    console.print(table)


def _raise_interrupt(signum, frame):  # SIGTERM (pre-emption, `kill`) ends the run like Ctrl-C: KILLED, resumable
    raise KeyboardInterrupt(f"signal {signum}")


def train_experiment(exp: Experiment, run_dir: Path | None = None, force: bool = False,
                     parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                     resume: bool = False) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from rich.console import Console

    cfg = exp.config
    start = time.time()
    accelerator = Accelerator()
    if cfg.runtime.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    console = Console()
    if accelerator.is_main_process:
        ensure_demo_data(exp)
    accelerator.wait_for_everyone()
    data = load_train_data(cfg)  # every check before the first training step

    if resume:
        holder = [str(run_dir)]
    else:
        holder = [str(new_run_dir(cfg, run_dir, force)) if accelerator.is_main_process else None]
    broadcast_object_list(holder)
    run_dir = Path(holder[0])
    main_folds = fold_ids(cfg.main, data.table)
    aux_folds = fold_ids(cfg.aux, data.table) if cfg.aux else None

    tracker = Tracker(cfg.tracking.mlflow and accelerator.is_main_process)
    status: dict[str, Any] = {"status": "running", "format_version": 1, "biomass_version": __version__,
                              "experiment": str(exp.path), "overrides": list(exp.overrides),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "num_processes": accelerator.num_processes, "children": {}}
    if resume:
        previous = json.loads((run_dir / STATUS_FILE).read_text())
        status.update({k: previous[k] for k in ("experiment", "overrides", "started", "children") if k in previous})
        status["resumed"] = previous.get("resumed", 0) + 1
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if resume and accelerator.is_main_process:
        console.print(f"resuming {run_dir}")
        if previous.get("mlflow_run_id"):
            status["mlflow_run_id"] = tracker.start(cfg.tracking.experiment or cfg.name, cfg.name, {}, {},
                                                    run_id=previous["mlflow_run_id"])
        write_json(run_dir / STATUS_FILE, status)
    elif accelerator.is_main_process:
        print_config_tree(console, cfg)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        folds_df = data.table[["image_id", "image_path"]].assign(main_fold=main_folds)
        if aux_folds is not None:
            folds_df["aux_fold"] = aux_folds
        folds_df.to_csv(run_dir / "folds.csv", index=False)
        all_tags = {**git_state(Path(__file__).parent), "experiment_file": str(exp.path), "run_dir": str(run_dir),
                    **(tags or {})}
        status["mlflow_run_id"] = tracker.start(cfg.tracking.experiment or cfg.name, all_tags.get("variant", cfg.name),
                                                cfg.dump(), all_tags, parent_run_id=parent_run_id)
        write_json(run_dir / STATUS_FILE, status)
        console.print(f"run directory: {run_dir}")
    try:
        with Progress(_progress_enabled() and accelerator.is_main_process) as progress:
            def on_child_started() -> None:  # record child run ids: a resumed run continues them
                write_json(run_dir / STATUS_FILE, status)

            common = dict(tracker=tracker, progress=progress, console=console, children=status["children"],
                          on_child_started=on_child_started)
            main_oof, main_results = train_stage(accelerator, cfg, "main", data, run_dir, main_folds, **common)
            results = {"main": main_results}
            aux_oof = None
            if cfg.aux is not None:
                aux_oof, results["aux"] = train_stage(accelerator, cfg, "aux", data, run_dir, aux_folds, **common)
        metrics, deployable = compute_metrics(accelerator, cfg, data, run_dir, main_folds, aux_folds, main_oof,
                                              results, aux_oof)
        if accelerator.is_main_process:
            write_outputs(cfg, data, run_dir, main_oof, aux_oof, deployable, metrics, tracker)
            summary_table(console, metrics, results)
            status.update(status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                          duration_s=round(time.time() - start, 1))
            write_json(run_dir / STATUS_FILE, status)
            tracker.end("FINISHED")
            console.print(f"cv/weighted_r2 {metrics['cv/weighted_r2']:.4f}"
                          + (f"  cv/weighted_r2_deployable {metrics['cv/weighted_r2_deployable']:.4f}"
                             if "cv/weighted_r2_deployable" in metrics else "")
                          + f"  ({elapsed(start)}) -> {run_dir}")
    except BaseException as err:
        if accelerator.is_main_process:
            status.update(status="killed" if isinstance(err, KeyboardInterrupt) else "failed", error=str(err)[:500])
            write_json(run_dir / STATUS_FILE, status)
            tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    accelerator.end_training()
    return run_dir


def _with_prefix(prefix: str, report: dict[str, Any], names) -> dict[str, float]:
    return {f"{prefix}{n}_r2": v for n, v in zip(names, report.values())}


def compute_metrics(accelerator, cfg, data, run_dir, main_folds, aux_folds, main_oof, results, aux_oof):
    y = data.table[list(TARGETS)].to_numpy(np.float64)
    scored = ~np.isnan(main_oof).any(axis=1)
    report = score_report(y[scored], main_oof[scored])
    metrics: dict[str, Any] = {"cv/weighted_r2": report["weighted_r2"], "cv/mean_target_r2": report["mean_target_r2"],
                               **{f"cv/{t}_r2": v for t, v in report["per_target"].items()},
                               "cv/images_scored": int(scored.sum())}
    metrics["folds"] = {stage: {str(r.fold): {"best_epoch": r.best_epoch, **r.best} for r in rs}
                        for stage, rs in results.items()}
    deployable = None
    if aux_oof is not None:
        aux_scored = ~np.isnan(aux_oof).any(axis=1)
        t = data.table[list(TABULAR)].to_numpy(np.float64)
        aux = stage_score("aux", t[aux_scored], aux_oof[aux_scored])
        metrics.update({f"cv/aux_{n}_r2": aux[f"r2/{n}"] for n in TABULAR})
        deployable = deployable_predictions(accelerator, cfg, data, run_dir, main_folds, results["main"], aux_oof)
        ok = ~np.isnan(deployable).any(axis=1)
        metrics["cv/weighted_r2_deployable"] = score_report(y[ok], deployable[ok])["weighted_r2"]
        metrics["cv/deployable_images_scored"] = int(ok.sum())
        leak = chain_is_leaky(cfg, main_folds, aux_folds)
        metrics["cv/deployable_leak"] = leak is not None
        if leak:
            metrics["cv/deployable_leak_reason"] = leak
            if accelerator.is_main_process:
                warnings.warn(f"the deployable CV is optimistic: {leak}", stacklevel=1)
                accelerator.print(f"warning: the deployable CV is optimistic: {leak}")
    return metrics, deployable


def write_outputs(cfg, data, run_dir, main_oof, aux_oof, deployable, metrics, tracker: Tracker) -> None:
    ids = data.table["image_id"]
    scored = ~np.isnan(main_oof).any(axis=1)
    _atomic_csv(long_format(ids[scored], main_oof[scored]), run_dir / "oof.csv")
    y = data.table[list(TARGETS)].to_numpy(np.float64)
    plots = [scatter_plot(y[scored], main_oof[scored], TARGETS, run_dir / "plots" / "oof_scatter.png",
                          f"{cfg.name}: out-of-fold, true NDVI/Height")]
    if aux_oof is not None:
        ok = ~np.isnan(aux_oof).any(axis=1)
        _atomic_csv(pd.DataFrame({"image_id": ids[ok], **{n: aux_oof[ok, j] for j, n in enumerate(TABULAR)}}),
                    run_dir / "aux_oof.csv")
        ok = ~np.isnan(deployable).any(axis=1)
        _atomic_csv(long_format(ids[ok], deployable[ok]), run_dir / "oof_deployable.csv")
        plots.append(scatter_plot(y[ok], deployable[ok], TARGETS, run_dir / "plots" / "oof_deployable_scatter.png",
                                  f"{cfg.name}: out-of-fold, aux-predicted NDVI/Height"))
        t = data.table[list(TABULAR)].to_numpy(np.float64)
        ok = ~np.isnan(aux_oof).any(axis=1)
        plots.append(scatter_plot(t[ok], aux_oof[ok], TABULAR, run_dir / "plots" / "aux_oof_scatter.png",
                                  f"{cfg.name}: aux stage, out-of-fold"))
    write_json(run_dir / "metrics.json", metrics)
    tracker.metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name in ("config.yaml", "folds.csv", "oof.csv", "oof_deployable.csv", "aux_oof.csv", "metrics.json"):
        tracker.artifact(run_dir / name)
    for p in plots:
        tracker.artifact(p, "plots")


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False, float_format="%.6f")
    os.replace(tmp, path)


def resume_experiment(run_dir: Path) -> Path:
    """Continue an interrupted run from its saved config and per-epoch state (`biomass.run --resume RUN_DIR`)."""
    from biomass.config import load_yaml, validate
    from biomass.errors import BiomassError

    status_file = run_dir / STATUS_FILE
    if not status_file.is_file() or not (run_dir / "config.yaml").is_file():
        raise BiomassError(f"{run_dir} is not a biomass run directory (no run.json / config.yaml)")
    if json.loads(status_file.read_text()).get("status") == "completed":
        raise BiomassError(f"{run_dir} already completed; nothing to resume")
    cfg = validate(load_yaml(run_dir / "config.yaml"))
    return train_experiment(Experiment(cfg, run_dir / "config.yaml", ()), run_dir=run_dir, resume=True)
