"""The cross-validation run behind `biomass.run`: setup -> stages (main, aux) x folds -> deployable CV -> outputs.

Each stage trains its folds in turn with `engine.loop.fit_fold`; a finished fold leaves a done marker, so a resumed
run skips it and continues an interrupted one from its saved per-epoch state.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import biomass.components  # noqa: F401  (fills the registries this module builds from)
from biomass import __version__
from biomass.chain import uses_tabular
from biomass.config.load import Experiment
from biomass.config.schema import ExperimentConfig
from biomass.cv.outputs import compute_metrics, summary_table, write_outputs
from biomass.data.source import TrainData, ensure_demo_data, load_train_data
from biomass.engine.build import build_stage_model, make_accelerator
from biomass.engine.checkpoint import backbone_state, write_json
from biomass.engine.loop import FoldResult, fit_fold
from biomass.errors import BiomassError
from biomass.preflight import check_batches, check_models, check_outputs
from biomass.registry import SPLITTERS
from biomass.rundir import RunDir, folds_to_train
from biomass.stages import AUX, MAIN, Stage, configured
from biomass.tracking import Tracker, git_state
from biomass.ui import Progress, elapsed, print_config_tree, progress_enabled


def fold_ids(cfg: ExperimentConfig, stage: Stage, table) -> np.ndarray:
    return SPLITTERS.build_node(stage.config(cfg).folds.splitter)(table)


def init_state(cfg: ExperimentConfig, stage: Stage, run: RunDir, fold: int) -> dict[str, torch.Tensor] | None:
    """The backbone a stage's fold starts from: `init_from` names a main checkpoint (fold 0, or the same fold)."""
    source = stage.config(cfg).init_from
    if source is None:
        return None
    return backbone_state(run.checkpoint(MAIN, 0 if source == "main/fold0" else fold))


def train_stage(accelerator, cfg: ExperimentConfig, stage: Stage, data: TrainData, run: RunDir, ids: np.ndarray,
                tracker: Tracker, progress: Progress, children: dict[str, str], on_child_started
                ) -> tuple[np.ndarray, list[FoldResult]]:
    stage_cfg = stage.config(cfg)
    reader = data.stage_reader(stage_cfg, cfg.data.cache_dir)
    oof = np.full((len(data.table), len(stage.targets)), np.nan)
    results = []
    chosen = folds_to_train(stage_cfg, ids)
    fold_task = progress.task(f"{stage.name} folds", len(chosen))
    epoch_task = progress.task("epochs", stage_cfg.train.epochs)
    batch_task = progress.task("batches", 1)
    for k in chosen:
        start = time.time()
        done = run.done_marker(stage, k)
        if done.is_file():  # resumed run: this fold finished before the interruption
            result = FoldResult.from_json(run.read_fold_result(stage, k))
            oof[result.val_index] = result.predictions
            results.append(result)
            accelerator.print(f"{stage.name} fold {k}: already complete (best epoch {result.best_epoch})")
            progress.advance(fold_task)
            continue
        train_idx, val_idx = np.flatnonzero(ids != k), np.flatnonzero(ids == k)
        progress.reset(epoch_task, f"{stage.name} fold {k} epochs", stage_cfg.train.epochs)
        n_batches = max(1, len(train_idx) // stage_cfg.train.batch_size // accelerator.num_processes)

        def log(row: dict[str, float], k=k) -> None:
            tracker.metrics({"train/loss": row["train/loss"], "val/loss": row["val/loss"],
                             f"val/{stage.score_metric}": row["val/score"], "lr": row["lr"],
                             **{f"val/{t}_r2": row[f"val/r2/{t}"] for t in stage.targets}}, step=int(row["epoch"]))
            progress.advance(epoch_task)
            progress.reset(batch_task, "batches", n_batches)
            accelerator.print(f"  {stage.name} fold {k} epoch {int(row['epoch']):>3}  train/loss "
                              f"{row['train/loss']:.4f}  val/loss {row['val/loss']:.4f}  val/score "
                              f"{row['val/score']:.4f}  lr {row['lr']:.2e}")

        child_key = f"{stage.name}/fold{k}"
        ctx = tracker.child(child_key, {"stage": stage.name, "fold": str(k)}, children.get(child_key)) \
            if accelerator.is_main_process else contextlib.nullcontext()
        with ctx:
            if tracker.enabled and accelerator.is_main_process:
                children[child_key] = tracker.mlflow.active_run().info.run_id
                on_child_started()
            result = fit_fold(accelerator, stage=stage, cfg=stage_cfg, table=data.table, reader=reader, fold=k,
                              train_idx=train_idx, val_idx=val_idx, seed=stage.seed(cfg.seed),
                              num_workers=cfg.data.num_workers, ckpt_path=run.checkpoint(stage, k),
                              init_state=init_state(cfg, stage, run, k),
                              log=log if accelerator.is_main_process else None,
                              progress=lambda: progress.advance(batch_task), state_dir=run.state_dir(stage, k),
                              compile_model=cfg.runtime.compile)
            tracker.metrics({"fold/score": result.best["score"], "fold/best_epoch": result.best_epoch})
        oof[val_idx] = result.predictions
        results.append(result)
        if accelerator.is_main_process:
            write_json(done, result.to_json())
            shutil.rmtree(run.state_dir(stage, k), ignore_errors=True)  # GBs for a ViT-H
        tracker.metrics({f"fold/{stage.fold_metric}": result.best["score"]}, step=k)
        accelerator.print(f"{stage.name} fold {k}: best epoch {result.best_epoch}, score "
                          f"{result.best['score']:.4f} ({elapsed(start)})")
        progress.advance(fold_task)
    return oof, results


def _raise_interrupt(signum, frame):  # SIGTERM (pre-emption, `kill`) ends the run like Ctrl-C: KILLED, resumable
    raise KeyboardInterrupt(f"signal {signum}")


def main_reads_tabular(cfg: ExperimentConfig) -> bool:
    with torch.device("meta"):
        model, _ = build_stage_model(MAIN, cfg.main, load_weights=False)
    return uses_tabular(model)


def train_experiment(exp: Experiment, run_dir: Path | None = None, force: bool = False,
                     parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                     resume: bool = False) -> Path:
    from accelerate.utils import broadcast_object_list
    from rich.console import Console

    cfg = exp.config
    start = time.time()
    accelerator = make_accelerator(cfg)
    console = Console()
    if accelerator.is_main_process:
        check_outputs(cfg, run_dir, resume)  # every place it writes: before any work
        ensure_demo_data(exp)
    accelerator.wait_for_everyone()
    data = load_train_data(cfg)  # every check before the first training step
    stages = configured(cfg)
    ids = {stage: fold_ids(cfg, stage, data.table) for stage in stages}
    folds = {stage: folds_to_train(stage.config(cfg), ids[stage]) for stage in stages}
    # the models on the meta device (a forward pass at the configured size) and every fold's batches: an error here
    # names the key before the run directory exists, so nothing is half-written and a retry needs no --force
    check_models(cfg, num_processes=accelerator.num_processes)
    check_batches(cfg, ids, accelerator.num_processes)

    if resume:
        holder = [str(run_dir)]
    else:
        holder = [str(RunDir.create(cfg.name, run_dir, force).path) if accelerator.is_main_process else None]
    broadcast_object_list(holder)
    run = RunDir(Path(holder[0]))

    tracker = Tracker(cfg.tracking.mlflow and accelerator.is_main_process)
    status: dict[str, Any] = {"status": "running", "biomass_version": __version__,
                              "experiment": str(exp.path), "overrides": list(exp.overrides),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "num_processes": accelerator.num_processes, "children": {}}
    previous: dict[str, Any] = {}
    if resume:
        previous = run.read_status()
        status.update({k: previous[k] for k in ("experiment", "overrides", "started", "children", "folds_rows")
                       if k in previous})
        status["resumed"] = previous.get("resumed", 0) + 1
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if resume and accelerator.is_main_process:
        console.print(f"resuming {run}")
        if previous.get("mlflow_run_id"):
            status["mlflow_run_id"] = tracker.start(cfg.tracking.experiment or cfg.name, cfg.name, {}, {},
                                                    run_id=previous["mlflow_run_id"])
        run.write_status(status)
    elif accelerator.is_main_process:
        print_config_tree(console, cfg)
        run.write_config(cfg)
        status["folds_rows"] = run.write_folds(data.table, ids)
        all_tags = {**git_state(Path(__file__).parent), "experiment_file": str(exp.path), "run_dir": str(run),
                    **(tags or {})}
        status["mlflow_run_id"] = tracker.start(cfg.tracking.experiment or cfg.name, all_tags.get("variant", cfg.name),
                                                cfg.dump(), all_tags, parent_run_id=parent_run_id)
        run.write_status(status)
        console.print(f"run directory: {run}")
    try:
        with Progress(progress_enabled() and accelerator.is_main_process) as progress:
            def on_child_started() -> None:  # record child run ids: a resumed run continues them
                run.write_status(status)

            oof: dict[Stage, np.ndarray] = {}
            results: dict[Stage, list[FoldResult]] = {}
            for stage in stages:
                oof[stage], results[stage] = train_stage(accelerator, cfg, stage, data, run, ids[stage], tracker,
                                                         progress, status["children"], on_child_started)
        metrics, deployable = compute_metrics(accelerator, cfg, data, run, ids, folds, oof[MAIN], results,
                                                 oof.get(AUX), main_reads_tabular(cfg))
        if accelerator.is_main_process:
            write_outputs(cfg, data, run, oof[MAIN], oof.get(AUX), deployable, metrics, tracker)
            summary_table(console, metrics, results)
            status.update(status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                          duration_s=round(time.time() - start, 1))
            run.write_status(status)
            tracker.end("FINISHED")
            console.print(f"cv/weighted_r2 {metrics['cv/weighted_r2']:.4f}"
                          + (f"  cv/weighted_r2_deployable {metrics['cv/weighted_r2_deployable']:.4f}"
                             if "cv/weighted_r2_deployable" in metrics else "")
                          + f"  ({elapsed(start)}) -> {run}")
    except BaseException as err:
        if accelerator.is_main_process:
            status.update(status="killed" if isinstance(err, KeyboardInterrupt) else "failed", error=str(err)[:500])
            run.write_status(status)
            tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    accelerator.end_training()
    return run.path


def resume_experiment(run_dir: Path) -> Path:
    """Continue an interrupted run from its saved config and per-epoch state (`biomass.run --resume RUN_DIR`)."""
    run = RunDir(run_dir)
    run.require_run()
    if run.read_status().get("status") == "completed":
        raise BiomassError(f"{run} already completed; nothing to resume")
    cfg = run.read_config()
    return train_experiment(Experiment(cfg, run.path / "config.yaml", ()), run_dir=run.path, resume=True)
