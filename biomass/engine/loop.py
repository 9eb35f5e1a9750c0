"""One fold of one stage on accelerate: `FoldTrainer`, read top to bottom.

`FoldTrainer.fit`: setup -> (train_epoch, evaluate, save best, save state)* -> the best epoch's predictions. The
same trainer fine-tunes a loaded fold model at test time (`biomass.ttt`): `setup` then `train_epoch`, nothing else.
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
from torch.utils.data import DataLoader

from biomass.config.schema import StageConfig
from biomass.data.images import EpochSampler, ImageDataset, Reader, build_augment, draw_seed
from biomass.data.scalers import Scaler
from biomass.engine.build import (build_stage_model, eval_batch_size, make_optimizer, make_scheduler, maybe_compile,
                                  per_process_batch, unwrap)
from biomass.engine.checkpoint import load_state, save_checkpoint, save_state
from biomass.metrics import NotScorable, require_finite
from biomass.stages import Stage

# Seed streams of one fold: every random draw is a function of (seed, fold, stream[, epoch]).
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


@dataclass
class FoldData:
    """What one fold trains on: the stage's table, its image reader and the fold's split of the table's rows."""

    table: pd.DataFrame
    reader: Reader
    train_idx: np.ndarray
    val_idx: np.ndarray


@dataclass
class Progress:
    """Where a fold's training stands after each epoch: what a resumed run reads back (`FoldTrainer.resume`)."""

    epoch: int = -1
    best: dict[str, float] | None = None
    best_epoch: int = -1
    best_pred: np.ndarray | None = None
    stale: int = 0  # epochs since the last improvement
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch,
                "best_pred": None if self.best_pred is None else self.best_pred.tolist(), "stale": self.stale,
                "history": self.history}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Progress:
        pred = d.get("best_pred")
        return cls(d["epoch"], d["best"], d["best_epoch"], None if pred is None else np.asarray(pred), d["stale"],
                   d["history"])


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


class Counted:
    """A loader that calls `tick()` after each batch it yields (a progress bar's clock); `len` is the loader's."""

    def __init__(self, loader, tick: Callable[[], None] | None):
        self.loader, self.tick = loader, tick

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            if self.tick is not None:
                self.tick()


def train_one_epoch(accelerator: Accelerator, model, loader, loss_fn, optimizer, cfg: StageConfig, ema=None,
                    skip: list[torch.nn.Parameter] = ()) -> float:
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


def improved(metrics: dict[str, float], best: dict[str, float] | None, select_by: str) -> bool:
    if best is None:
        return True
    if select_by == "val_loss":
        return metrics["loss"] < best["loss"]
    return metrics["score"] > best["score"]


@dataclass
class FoldTrainer:
    """One fold of one stage. Built with what stays fixed (the stage, its config, the fold, the seed and where its
    files go); `setup` prepares model, optimizer, scheduler and loaders on the accelerator; `train_epoch`,
    `evaluate`, `save_best`, `save_state` and `resume` act on that state. `fit` is the CV's whole fold; test-time
    training (`biomass.ttt`) calls `setup` and `train_epoch` on a loaded model.

    With `state_dir`, the full training state is saved after every epoch and, when present, training resumes from
    it: the result equals an uninterrupted run's, since data order, augmentation and dropout draws are functions of
    (seed, fold, epoch) and everything else is in the state."""

    accelerator: Accelerator
    stage: Stage
    cfg: StageConfig
    fold: int
    seed: int  # the root of every random draw: (seed, fold, stream[, epoch])
    num_workers: int = 0
    compile_model: bool = False  # runtime.compile: torch.compile the prepared model
    checkpoint: Path | None = None  # where the best epoch's weights go (None: keep nothing, as test-time training)
    state_dir: Path | None = None  # the resumable per-epoch state
    extra_meta: dict[str, Any] = field(default_factory=dict)  # more facts for the checkpoint's JSON
    log: Callable[[dict[str, float]], None] | None = None  # one row per epoch
    tick: Callable[[], None] | None = None  # after every training batch (a progress bar)
    # set by setup()
    model: Any = field(default=None, init=False)
    loss_fn: Any = field(default=None, init=False)
    optimizer: Any = field(default=None, init=False)
    scheduler: Any = field(default=None, init=False)
    ema: Any = field(default=None, init=False)
    train_loader: Any = field(default=None, init=False)
    val_loader: Any = field(default=None, init=False)

    # ---------------------------------------------------------------------------------------------------- setup
    def loader(self, reader: Reader, index: np.ndarray, tabular: np.ndarray, targets: np.ndarray | None,
               train: bool) -> DataLoader:
        """Images `index` of the reader's list (`tabular`, `targets` indexed alike), ordered and augmented by this
        fold's training or validation stream."""
        cfg, n_proc = self.cfg, self.accelerator.num_processes
        seed = draw_seed(self.seed, self.fold, TRAIN_ORDER_STREAM if train else VAL_ORDER_STREAM)
        augment = build_augment(cfg.augment.train if train else cfg.augment.val)
        dataset = ImageDataset(lambda i: reader(int(index[i])), len(index), tabular[index],
                               None if targets is None else targets[index], augment, seed)
        batch_size = (per_process_batch(cfg.train.batch_size, n_proc, "train.batch_size") if train
                      else eval_batch_size(cfg, n_proc))
        return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(index), seed, shuffle=train),
                          drop_last=train and cfg.train.drop_last and len(index) > batch_size,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0)

    def setup(self, model: torch.nn.Module, loss_fn: torch.nn.Module, train_loader: DataLoader,
              val_loader: DataLoader | None = None, fine_tune: bool = False) -> None:
        """Optimizer and scheduler from the config, everything prepared on the accelerator (and compiled when
        asked), the loss on the device, the EMA (`train.ema`). `fine_tune` (test-time training): a constant
        learning rate and no EMA."""
        acc = self.accelerator
        optimizer = make_optimizer(model, self.cfg, acc.device)
        self.scheduler = None if fine_tune else make_scheduler(optimizer, self.cfg)
        loaders = [train_loader] + ([val_loader] if val_loader is not None else [])
        model, self.optimizer, *loaders = acc.prepare(model, optimizer, *loaders)
        self.model = maybe_compile(model, self.compile_model)
        self.train_loader, self.val_loader = loaders[0], (loaders[1] if val_loader is not None else None)
        self.loss_fn = loss_fn.to(acc.device)
        self.ema = None if fine_tune else make_ema(self.plain_model, self.cfg)

    @property
    def plain_model(self) -> torch.nn.Module:
        """The model without DDP and compile wrappers: what checkpoints hold."""
        return unwrap(self.accelerator, self.model)

    @property
    def scored_model(self) -> torch.nn.Module:
        """With `train.ema` the EMA weights are evaluated and saved; else the model itself."""
        return self.model if self.ema is None else self.ema.module

    # ---------------------------------------------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int, skip: list[torch.nn.Parameter] = ()) -> float:
        """One epoch; dropout draws from torch's RNG seeded per epoch, so a resumed epoch draws what the original
        did. A non-finite training loss is an error naming the stage, fold and epoch."""
        torch.manual_seed(draw_seed(self.seed, self.fold, DROPOUT_STREAM, epoch))
        self.train_loader.set_epoch(epoch)
        loss = train_one_epoch(self.accelerator, self.model, Counted(self.train_loader, self.tick), self.loss_fn,
                               self.optimizer, self.cfg, self.ema, skip)
        if not math.isfinite(loss):
            raise NotScorable(f"{self.where(epoch)}: training loss is {loss}; the training diverged: lower "
                              f"{self.stage.name}.optim.lr")
        return loss

    def where(self, epoch: int) -> str:
        """Names this fold in an error: its run directory's fold folder, stage, fold and epoch."""
        place = f"{self.checkpoint.parent}: " if self.checkpoint is not None else ""
        return f"{place}{self.stage.name} fold {self.fold} epoch {epoch}"

    def evaluate(self, targets_std: np.ndarray, y_true: np.ndarray, scaler: Scaler, who: str = "validation"
                 ) -> tuple[dict[str, float], np.ndarray]:
        """Validation loss (standardised space, `targets_std` of the validation rows, in `val_idx` order as the
        loader's `index`) and the stage's scores (original units, `y_true` likewise) of the current model (its EMA
        with `train.ema`). A non-finite prediction is an error naming `who` (the fold and epoch), never a NaN score."""
        model, loss_fn = self.scored_model.eval(), self.loss_fn
        raw, index = gather_predictions(self.accelerator, self.val_loader, lambda b: model(b["image"], b["tabular"]))
        loss = validation_loss(loss_fn, raw, targets_std[index], self.cfg.train.val_loss_mean,
                               self.cfg.train.eval_batch_size or 2 * self.cfg.train.batch_size)
        pred = scaler.inverse(loss_fn.point(torch.as_tensor(raw)).numpy())
        loss_fn.to(self.accelerator.device)
        require_finite(pred, who)
        return {"loss": loss, **self.stage.score(y_true[index], pred)}, pred

    def step_scheduler(self, metrics: dict[str, float]) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics["loss"])
        else:
            self.scheduler.step()

    # ----------------------------------------------------------------------------------------------------- files
    def save_best(self, meta: dict[str, Any]) -> None:
        """The best epoch's weights and `meta` at `checkpoint` (main process only). A PEFT backbone with a base
        weights file keeps adapters + head only; the checkpoint's JSON names that file."""
        if self.checkpoint is None or not self.accelerator.is_main_process:
            return
        meta = {**meta, **self.extra_meta}
        base = peft_base_weights(self.cfg)
        if base is not None:
            meta["base_weights"] = {"path": str(base), "bytes": Path(base).stat().st_size}
        save_checkpoint(self.plain_model if self.ema is None else self.ema.module, self.checkpoint, meta,
                        partial=base is not None)

    def save_state(self, progress: Progress) -> None:
        if self.state_dir is not None and self.accelerator.is_main_process:
            save_state(self.state_dir, self.plain_model, self.optimizer, self.scheduler, progress.to_json(), self.ema)

    def resume(self) -> Progress:
        """The saved progress after the last finished epoch (model, optimizer, scheduler and EMA restored), or a
        fresh start."""
        if self.state_dir is None or not (self.state_dir / "progress.json").is_file():
            return Progress()
        return Progress.from_json(load_state(self.state_dir, self.plain_model, self.optimizer, self.scheduler,
                                             self.ema))

    # ------------------------------------------------------------------------------------------------------- fit
    def fit(self, data: FoldData, init_state: dict[str, torch.Tensor] | None = None) -> FoldResult:
        """Train the fold; keep the best epoch's checkpoint and return its validation predictions. `init_state`:
        backbone tensors to start from (`init_from`)."""
        stage, cfg, acc = self.stage, self.cfg, self.accelerator
        scalers = fit_scalers(stage, cfg, data.table, data.train_idx)
        y_all = data.table[list(stage.targets)].to_numpy(np.float64)
        y_std = scalers["targets"].transform(y_all).astype(np.float32)
        x_tab = (scalers["tabular"].transform(data.table[list(stage.inputs)].to_numpy(np.float64))
                 if "tabular" in scalers else np.zeros((len(data.table), 0))).astype(np.float32)

        torch.manual_seed(draw_seed(self.seed, self.fold, INIT_STREAM))  # same initial weights everywhere, always
        model, loss_fn = build_stage_model(stage, cfg)
        if init_state is not None:
            missing = model.backbone.load_state_dict(init_state, strict=False)
            if missing.missing_keys:
                raise RuntimeError(f"init_from checkpoint lacks backbone keys, e.g. {missing.missing_keys[0]}")
        model.target_space.fit(scalers["targets"], y_std[data.train_idx])
        self.setup(model, loss_fn, self.loader(data.reader, data.train_idx, x_tab, y_std, True),
                   self.loader(data.reader, data.val_idx, x_tab, y_std, False))
        # train.warmup_frozen_epochs: the backbone's trainable tensors sit out the first epochs (head warm-up)
        warm = [p for p in self.plain_model.backbone.parameters() if p.requires_grad]
        state = self.resume()
        finished = cfg.train.patience is not None and state.stale >= cfg.train.patience
        for epoch in range(state.epoch + 1, 0 if finished else cfg.train.epochs):
            lr = self.optimizer.param_groups[0]["lr"]
            frozen = warm if epoch < cfg.train.warmup_frozen_epochs else []
            if acc.num_processes == 1:  # no backward through a resting backbone (DDP keeps its grad hooks)
                for p in warm:
                    p.requires_grad_(not frozen)
            train_loss = self.train_epoch(epoch, frozen)
            who = f"{self.where(epoch)} (train/loss {train_loss:.4g}), validation"
            metrics, pred = self.evaluate(y_std[data.val_idx], y_all[data.val_idx], scalers["targets"], who)
            self.step_scheduler(metrics)
            row = {"epoch": epoch, "lr": lr, "train/loss": train_loss, "val/loss": metrics["loss"],
                   "val/score": metrics["score"], **{f"val/{k}": v for k, v in metrics.items() if k.startswith("r2/")}}
            state.history.append(row)
            if self.log is not None:
                self.log(row)
            state.epoch = epoch
            if improved(metrics, state.best, cfg.train.select_by):
                state.best, state.best_epoch, state.best_pred, state.stale = metrics, epoch, pred, 0
                self.save_best({"stage": stage.name, "fold": self.fold, "epoch": epoch, "metrics": metrics,
                                "targets": list(stage.targets), "inputs": list(stage.inputs),
                                "scalers": {k: s.to_dict() for k, s in scalers.items()},
                                "train_images": int(len(data.train_idx)), "val_images": int(len(data.val_idx))})
            else:
                state.stale += 1
            self.save_state(state)
            acc.wait_for_everyone()
            if cfg.train.patience and state.stale >= cfg.train.patience:
                break
        acc.wait_for_everyone()
        acc.free_memory()
        assert state.best is not None and state.best_pred is not None
        return FoldResult(self.fold, state.best_epoch, state.best, np.asarray(data.val_idx), state.best_pred,
                          state.history)
