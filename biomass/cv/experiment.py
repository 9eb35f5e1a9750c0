"""The cross-validation run behind `biomass.run`, as a recipe: check -> train the stages (main, aux) fold by fold
(`engine.loop.FoldTrainer`) -> the chain on each fold's held-out images (`chain.Chain`) -> score -> write.

A finished fold leaves a done marker, so a resumed run skips it and continues an interrupted one from its saved
per-epoch state.
"""
from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

import biomass.components  # noqa: F401  (fills the registries this module builds from)
from biomass import __version__
from biomass.chain import Assignment, Chain
from biomass.config.load import Experiment
from biomass.config.schema import ExperimentConfig
from biomass.cv.outputs import (OutOfFold, chain_runs, cv_metrics, deployable_metrics, summary_table,
                                write_outputs)
from biomass.data.source import TrainData, ensure_demo_data, load_train_data
from biomass.engine.build import make_accelerator
from biomass.engine.checkpoint import backbone_state
from biomass.engine.loop import FoldData, FoldResult, FoldTrainer
from biomass.errors import BiomassError, sigterm_interrupts
from biomass.places import write_json
from biomass.preflight import check_batches, check_models, check_outputs
from biomass.registry import SPLITTERS
from biomass.rundir import RunDir, folds_to_train
from biomass.stages import AUX, MAIN, Stage, configured
from biomass.tracking import Tracker, git_state
from biomass.ttt import labelled_from
from biomass.ui import Progress, elapsed, print_config_tree, progress_enabled


def fold_ids(cfg: ExperimentConfig, stage: Stage, table) -> np.ndarray:
    return SPLITTERS.build_node(stage.config(cfg).folds.splitter)(table)


def deployable_predictions(accelerator: Accelerator, cfg: ExperimentConfig, data: TrainData, run: RunDir,
                           ids: dict[Stage, np.ndarray], folds: dict[Stage, list[int]]) -> np.ndarray:
    """The chain out of fold: biomass (n, 5) in grams, NaN where no fold held a row out. With `infer.ttt` each main
    fold fine-tunes on its training images + its held-out images pseudo-labelled, as it would on the test set."""
    labelled = labelled_from(cfg, data, ids[MAIN], folds[MAIN]) if cfg.infer.ttt is not None else None
    chain = Chain(accelerator, run, cfg, labelled=labelled)
    return chain.predict(data.images, Assignment.held_out(ids, folds))[0]


@dataclass
class StageTraining:
    """What every fold of every stage shares while a run trains: the accelerator, config, data, run directory,
    tracker, progress bars and the run's status (child MLflow run ids, rewritten as each child starts)."""

    accelerator: Accelerator
    cfg: ExperimentConfig
    data: TrainData
    run: RunDir
    tracker: Tracker
    progress: Progress
    status: dict[str, Any]
    bars: tuple = field(default=(None, None), init=False)  # this stage's progress bars: epochs, batches

    def train(self, stage: Stage, ids: np.ndarray) -> tuple[np.ndarray, list[FoldResult]]:
        """Every fold the stage trains: its out-of-fold predictions (NaN where no fold held a row out) and results."""
        stage_cfg = stage.config(self.cfg)
        reader = self.data.images.stage_reader(self.cfg, stage, training=True)
        oof = np.full((len(self.data.table), len(stage.targets)), np.nan)
        results = []
        chosen = folds_to_train(stage_cfg, ids)
        fold_task = self.progress.task(f"{stage.name} folds", len(chosen))
        self.bars = (self.progress.task("epochs", stage_cfg.train.epochs), self.progress.task("batches", 1))
        for k in chosen:
            result = self.fold(stage, k, FoldData(self.data.table, reader, np.flatnonzero(ids != k),
                                                  np.flatnonzero(ids == k)))
            oof[result.val_index] = result.predictions
            results.append(result)
            self.progress.advance(fold_task)
        return oof, results

    def fold(self, stage: Stage, k: int, data: FoldData) -> FoldResult:
        """One fold: read back when a resumed run finished it before, else trained (continued from its saved state)."""
        acc, run, tracker = self.accelerator, self.run, self.tracker
        start = time.time()
        done = run.done_marker(stage, k)
        if done.is_file():  # resumed run: this fold finished before the interruption
            result = FoldResult.from_json(run.read_fold_result(stage, k))
            acc.print(f"{stage.name} fold {k}: already complete (best epoch {result.best_epoch})")
            return result
        stage_cfg = stage.config(self.cfg)
        epochs, batches = self.bars
        self.progress.reset(epochs, f"{stage.name} fold {k} epochs", stage_cfg.train.epochs)
        n_batches = max(1, len(data.train_idx) // stage_cfg.train.batch_size // acc.num_processes)

        def log(row: dict[str, float]) -> None:
            tracker.metrics({"train/loss": row["train/loss"], "val/loss": row["val/loss"],
                             f"val/{stage.score_metric}": row["val/score"], "lr": row["lr"],
                             **{f"val/{t}_r2": row[f"val/r2/{t}"] for t in stage.targets}}, step=int(row["epoch"]))
            self.progress.advance(epochs)
            self.progress.reset(batches, "batches", n_batches)
            acc.print(f"  {stage.name} fold {k} epoch {int(row['epoch']):>3}  train/loss {row['train/loss']:.4f}  "
                      f"val/loss {row['val/loss']:.4f}  val/score {row['val/score']:.4f}  lr {row['lr']:.2e}")

        trainer = FoldTrainer(acc, stage, stage_cfg, k, stage.seed(self.cfg.seed), self.cfg.data.num_workers,
                              self.cfg.runtime.compile, run.checkpoint(stage, k), run.state_dir(stage, k),
                              log=log if acc.is_main_process else None,
                              tick=lambda: self.progress.advance(batches))
        child_key, children = f"{stage.name}/fold{k}", self.status["children"]
        with tracker.child(child_key, {"stage": stage.name, "fold": str(k)}, children.get(child_key)) \
                if acc.is_main_process else contextlib.nullcontext():
            if tracker.enabled and acc.is_main_process:  # record child run ids: a resumed run continues them
                children[child_key] = tracker.active_run_id()
                run.write_status(self.status)
            result = trainer.fit(data, self.init_state(stage, k))
            tracker.metrics({"fold/score": result.best["score"], "fold/best_epoch": result.best_epoch})
        if acc.is_main_process:
            write_json(done, result.to_json())
            shutil.rmtree(run.state_dir(stage, k), ignore_errors=True)  # GBs for a ViT-H
        tracker.metrics({f"fold/{stage.fold_metric}": result.best["score"]}, step=k)
        acc.print(f"{stage.name} fold {k}: best epoch {result.best_epoch}, score {result.best['score']:.4f} "
                  f"({elapsed(start)})")
        return result

    def init_state(self, stage: Stage, fold: int) -> dict[str, torch.Tensor] | None:
        """The backbone a stage's fold starts from: `init_from` names a main checkpoint (fold 0, or the same fold)."""
        source = stage.config(self.cfg).init_from
        if source is None:
            return None
        return backbone_state(self.run.checkpoint(MAIN, 0 if source == "main/fold0" else fold))


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
    facts = check_models(cfg, num_processes=accelerator.num_processes)
    check_batches(cfg, ids, facts, accelerator.num_processes)

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
    with sigterm_interrupts():
        try:
            # train the stages
            with Progress(progress_enabled() and accelerator.is_main_process) as progress:
                training = StageTraining(accelerator, cfg, data, run, tracker, progress, status)
                trained = {stage: training.train(stage, ids[stage]) for stage in stages}
            results = {stage: fold_results for stage, (_, fold_results) in trained.items()}
            oof = OutOfFold(str(run), Assignment.held_out(ids, folds), trained[MAIN][0],
                            trained[AUX][0] if AUX in trained else None)
            # the chain on each fold's held-out images, then score
            metrics = cv_metrics(data, oof, results)
            if chain_runs(cfg, facts[MAIN].reads_tabular):
                oof.deployable = deployable_predictions(accelerator, cfg, data, run, ids, folds)
                metrics.update(deployable_metrics(cfg, data, oof, ids))
                if metrics["cv/deployable_leak"] and accelerator.is_main_process:
                    leak = metrics["cv/deployable_leak_reason"]
                    warnings.warn(f"the deployable CV is optimistic: {leak}", stacklevel=1)
                    accelerator.print(f"warning: the deployable CV is optimistic: {leak}")
            # write
            if accelerator.is_main_process:
                write_outputs(cfg, data, run, oof, metrics, tracker)
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
                killed = isinstance(err, KeyboardInterrupt)
                status.update(status="killed" if killed else "failed", error=str(err)[:500])
                run.write_status(status)
                tracker.end("KILLED" if killed else "FAILED")
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
