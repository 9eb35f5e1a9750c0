"""One fold's training on accelerate: plain functions, read top to bottom.

fit_fold: build -> prepare -> (train_one_epoch, evaluate, select, early-stop)* -> the best epoch's predictions.
Only the main process writes checkpoints; every process computes the same gathered validation numbers.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from biomass.config.schema import StageConfig
from biomass.data.images import Reader, draw_seed
from biomass.data.scalers import Scaler
from biomass.engine.build import build_stage_model, make_loader, make_optimizer, make_scheduler, maybe_compile, unwrap
from biomass.engine.checkpoint import load_state, save_checkpoint, save_state
from biomass.metrics import NotScorable, require_finite
from biomass.stages import Stage

# Seed streams of one fold: every random draw is a function of (stage seed, fold, stream[, epoch]).
INIT_STREAM = 1  # initial weights (the same on every process and every run)
TRAIN_ORDER_STREAM = 2  # training order and augmentation
VAL_ORDER_STREAM = 3  # validation loader (unshuffled, unaugmented by default)
DROPOUT_STREAM = 4  # torch's RNG per epoch: dropout, drop-path


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    best: dict[str, float]  # val metrics of the best epoch
    val_index: np.ndarray  # table rows scored
    predictions: np.ndarray  # (n_val, n_targets), original units
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"fold": self.fold, "best_epoch": self.best_epoch, "best": self.best,
                "val_index": self.val_index.tolist(), "predictions": self.predictions.tolist(),
                "history": self.history}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FoldResult:
        return cls(d["fold"], d["best_epoch"], d["best"], np.asarray(d["val_index"], dtype=np.int64),
                   np.asarray(d["predictions"], dtype=np.float64), d["history"])


def fit_scalers(stage: Stage, cfg: StageConfig, table: pd.DataFrame, train_idx: np.ndarray) -> dict[str, Scaler]:
    """Per-fold StandardScalers fitted on the fold's training images only."""
    y = table[list(stage.targets)].to_numpy(np.float64)[train_idx]
    scalers = {"targets": Scaler.fit(y, log1p=cfg.targets.transform == "log1p")}
    if stage.inputs:
        scalers["tabular"] = Scaler.fit(table[list(stage.inputs)].to_numpy(np.float64)[train_idx])
    return scalers


def peft_base_weights(cfg: StageConfig) -> str | None:
    """The base weights file of a PEFT backbone (its checkpoints then hold only the trainable tensors); None for a
    full checkpoint (no PEFT, or no weights file to refer to: random init or a hub download)."""
    node = cfg.model.backbone
    return node.get("weights") if node.get("peft") is not None and node.get("weights") else None


def make_ema(model: torch.nn.Module, cfg: StageConfig):
    """`train.ema`: timm's ModelEmaV3 of the (unwrapped) model, on its device; None when off."""
    if cfg.train.ema is None:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=cfg.train.ema.decay, use_warmup=cfg.train.ema.warmup)
    ema.steps = 0  # optimizer steps so far: the warm-up's clock
    return ema


def train_one_epoch(accelerator: Accelerator, model, loader, loss_fn, optimizer, cfg: StageConfig,
                    progress=None, ema=None, skip: list[torch.nn.Parameter] = ()) -> float:
    """One pass over the loader. `ema`: updated after every optimizer step. `skip`: parameters that do not step
    this epoch (the backbone during `train.warmup_frozen_epochs`): their gradients are dropped before the step."""
    model.train()
    total = torch.zeros((), device=accelerator.device)
    steps = 0
    accum = cfg.train.grad_accum
    n = len(loader)
    params = [p for p in model.parameters() if p.requires_grad]
    for step, batch in enumerate(loader):
        sync = (step + 1) % accum == 0 or step + 1 == n
        ctx = contextlib.nullcontext() if sync else accelerator.no_sync(model)
        with ctx:
            raw = model(batch["image"], batch["tabular"])
            loss = loss_fn(raw, batch["target"])
            accelerator.backward(loss / accum)
        if sync:
            if cfg.train.grad_clip:
                accelerator.clip_grad_norm_(params, cfg.train.grad_clip)
            for p in skip:
                p.grad = None  # no gradient: AdamW/SGD leave the tensor and its state alone (no decay either)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.steps += 1
                ema.update(unwrap(accelerator, model), step=ema.steps)
        total += loss.detach()  # stays on the device: no host sync inside the loop
        steps += 1
        if progress is not None:
            progress()
    mean = accelerator.reduce(total / max(steps, 1), reduction="mean")
    return float(mean.item())


@torch.inference_mode()
def gather_predictions(accelerator: Accelerator, loader, forward: Callable[[dict], torch.Tensor]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """`forward(batch)` for every batch of a (prepared) loader, gathered across processes so that each image
    counts exactly once, ordered by dataset index: (outputs, index)."""
    outs, idx = [], []
    for batch in loader:
        with accelerator.autocast():
            out = forward(batch).float()
        out, index = accelerator.gather_for_metrics((out, batch["index"]))
        outs.append(out.cpu())
        idx.append(index.cpu())
    out = torch.cat(outs).numpy()
    index = torch.cat(idx).numpy()
    order = np.argsort(index, kind="stable")
    return out[order], index[order]


def validation_loss(loss_fn: torch.nn.Module, raw: np.ndarray, targets_std: np.ndarray, mean_over: str,
                    batch_size: int) -> float:
    """`image`: the loss over all validation images at once. `batch`: the mean of per-batch means over batches of
    `batch_size` images in validation order, as the seed computed it (its last, smaller batch weighs as much as a
    full one); it decides the best epoch and steps a plateau scheduler."""
    loss_fn = loss_fn.cpu()
    raw_t, y_t = torch.as_tensor(raw), torch.as_tensor(targets_std, dtype=torch.float32)
    if mean_over == "image":
        return float(loss_fn(raw_t, y_t))
    return float(np.mean([float(loss_fn(raw_t[i:i + batch_size], y_t[i:i + batch_size]))
                          for i in range(0, len(raw_t), batch_size)]))


def evaluate(accelerator: Accelerator, model, loader, loss_fn, targets_std: np.ndarray, y_true: np.ndarray,
             scaler: Scaler, stage: Stage, cfg: StageConfig, who: str = "validation"
             ) -> tuple[dict[str, float], np.ndarray]:
    """Validation loss (standardised space) and the stage's scores (original units) of one epoch's model; a
    non-finite prediction is an error naming `who` (the fold and epoch), never a NaN score."""
    model.eval()
    raw, index = gather_predictions(accelerator, loader, lambda b: model(b["image"], b["tabular"]))
    loss = validation_loss(loss_fn, raw, targets_std[index], cfg.train.val_loss_mean,
                           cfg.train.eval_batch_size or 2 * cfg.train.batch_size)
    pred = scaler.inverse(loss_fn.point(torch.as_tensor(raw)).numpy())
    loss_fn.to(accelerator.device)
    require_finite(pred, who)
    return {"loss": loss, **stage.score(y_true[index], pred)}, pred


def improved(metrics: dict[str, float], best: dict[str, float] | None, select_by: str) -> bool:
    if best is None:
        return True
    if select_by == "val_loss":
        return metrics["loss"] < best["loss"]
    return metrics["score"] > best["score"]


def fit_fold(accelerator: Accelerator, *, stage: Stage, cfg: StageConfig, table, reader: Reader, fold: int,
             train_idx: np.ndarray, val_idx: np.ndarray, seed: int, num_workers: int, ckpt_path: Path,
             init_state: dict[str, torch.Tensor] | None = None, log=None, progress=None,
             extra_meta: dict[str, Any] | None = None, state_dir: Path | None = None,
             compile_model: bool = False) -> FoldResult:
    """Train one fold; keep the best epoch's checkpoint at `ckpt_path` and return its validation predictions.

    With `state_dir`, the full training state is saved after every epoch and, when present, training resumes from
    it: the result equals an uninterrupted run's, since data order, augmentation and dropout draws are functions of
    (seed, fold, epoch) and everything else is in the state. `compile_model`: torch.compile it (`runtime.compile`).
    """
    scalers = fit_scalers(stage, cfg, table, train_idx)
    y_all = table[list(stage.targets)].to_numpy(np.float64)
    y_std = scalers["targets"].transform(y_all).astype(np.float32)
    x_tab = (scalers["tabular"].transform(table[list(stage.inputs)].to_numpy(np.float64))
             if "tabular" in scalers else np.zeros((len(table), 0))).astype(np.float32)

    torch.manual_seed(draw_seed(seed, fold, INIT_STREAM))  # same initial weights on every process and every run
    model, loss_fn = build_stage_model(stage, cfg)
    if init_state is not None:
        missing = model.backbone.load_state_dict(init_state, strict=False)
        if missing.missing_keys:
            raise RuntimeError(f"init_from checkpoint lacks backbone keys, e.g. {missing.missing_keys[0]}")
    model.target_space.fit(scalers["targets"], y_std[train_idx])

    n_proc = accelerator.num_processes
    train_loader = make_loader(reader, train_idx, x_tab, y_std, cfg, draw_seed(seed, fold, TRAIN_ORDER_STREAM), True,
                               num_workers, n_proc)
    val_loader = make_loader(reader, val_idx, x_tab, y_std, cfg, draw_seed(seed, fold, VAL_ORDER_STREAM), False,
                             num_workers, n_proc)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    scheduler = make_scheduler(optimizer, cfg)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    model = maybe_compile(model, compile_model)
    loss_fn.to(accelerator.device)

    y_val = y_all[val_idx]
    progress_state: dict[str, Any] = {"epoch": -1, "best": None, "best_epoch": -1, "best_pred": None, "stale": 0,
                                      "history": []}
    ema = make_ema(unwrap(accelerator, model), cfg)
    # train.warmup_frozen_epochs: the backbone's trainable tensors sit out the first epochs (head warm-up)
    warm = [p for p in unwrap(accelerator, model).backbone.parameters() if p.requires_grad]
    if state_dir is not None and (state_dir / "progress.json").is_file():  # resume after the last saved epoch
        progress_state = load_state(state_dir, unwrap(accelerator, model), optimizer, scheduler, ema)
    best, best_epoch, stale, history = (progress_state["best"], progress_state["best_epoch"], progress_state["stale"],
                                        progress_state["history"])
    best_pred = None if progress_state["best_pred"] is None else np.asarray(progress_state["best_pred"])
    finished = cfg.train.patience is not None and stale >= cfg.train.patience
    for epoch in range(progress_state["epoch"] + 1, 0 if finished else cfg.train.epochs):
        # Dropout draws from torch's RNG: seed it per epoch, so a resumed epoch draws what the original did.
        torch.manual_seed(draw_seed(seed, fold, DROPOUT_STREAM, epoch))
        train_loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        frozen = warm if epoch < cfg.train.warmup_frozen_epochs else []
        if accelerator.num_processes == 1:  # no backward through a resting backbone (DDP keeps its grad hooks)
            for p in warm:
                p.requires_grad_(not frozen)
        train_loss = train_one_epoch(accelerator, model, train_loader, loss_fn, optimizer, cfg, progress, ema, frozen)
        scored = model if ema is None else ema.module  # with train.ema the EMA weights are evaluated and saved
        who = f"{ckpt_path.parent}: {stage.name} fold {fold} epoch {epoch} (train/loss {train_loss:.4g}), validation"
        metrics, pred = evaluate(accelerator, scored, val_loader, loss_fn, y_std[val_idx], y_val,
                                 scalers["targets"], stage, cfg, who)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(metrics["loss"])
        else:
            scheduler.step()
        row = {"epoch": epoch, "lr": lr, "train/loss": train_loss, "val/loss": metrics["loss"],
               "val/score": metrics["score"], **{f"val/{k}": v for k, v in metrics.items() if k.startswith("r2/")}}
        history.append(row)
        if log is not None:
            log(row)
        if not math.isfinite(train_loss):
            raise NotScorable(f"{ckpt_path.parent}: {stage.name} fold {fold}: training loss is {train_loss} at epoch "
                              f"{epoch}; the training diverged: lower {stage.name}.optim.lr")
        if improved(metrics, best, cfg.train.select_by):
            best, best_epoch, best_pred, stale = metrics, epoch, pred, 0
            if accelerator.is_main_process:
                meta = {"stage": stage.name, "fold": fold, "epoch": epoch, "metrics": metrics,
                        "targets": list(stage.targets), "inputs": list(stage.inputs),
                        "scalers": {k: s.to_dict() for k, s in scalers.items()},
                        "train_images": int(len(train_idx)), "val_images": int(len(val_idx)), **(extra_meta or {})}
                base = peft_base_weights(cfg)
                if base is not None:  # PEFT: adapters + head only; the base weights stay in their file
                    meta["base_weights"] = {"path": str(base), "bytes": Path(base).stat().st_size}
                save_checkpoint(unwrap(accelerator, model) if ema is None else ema.module, ckpt_path, meta,
                                partial=base is not None)
        else:
            stale += 1
        if state_dir is not None and accelerator.is_main_process:
            save_state(state_dir, unwrap(accelerator, model), optimizer, scheduler,
                       {"epoch": epoch, "best": best, "best_epoch": best_epoch, "best_pred": best_pred.tolist(),
                        "stale": stale, "history": history}, ema)
        accelerator.wait_for_everyone()
        if cfg.train.patience and stale >= cfg.train.patience:
            break
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    assert best is not None and best_pred is not None
    return FoldResult(fold, best_epoch, best, np.asarray(val_idx), best_pred, history)
