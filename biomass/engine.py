"""Training and evaluation of one fold on accelerate: plain functions, read top to bottom.

fit_fold: build -> prepare -> (train_one_epoch, validate, select, early-stop)* -> the best epoch's predictions.
Only the main process writes checkpoints; every process computes the same gathered validation numbers.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from biomass.config import StageConfig
from biomass.constants import TABULAR, TARGETS
from biomass.data.images import EpochSampler, ImageDataset, Reader, build_augment, draw_seed
from biomass.data.scalers import Scaler
from biomass.metrics import per_target_r2, weighted_r2
from biomass.models.model import BiomassModel, build_model
from biomass.registry import LOSSES, SCHEDULERS

STAGE_TARGETS = {"main": TARGETS, "aux": TABULAR}
STAGE_INPUTS = {"main": TABULAR, "aux": ()}


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    best: dict[str, float]  # val metrics of the best epoch
    val_index: np.ndarray  # table rows scored
    predictions: np.ndarray  # (n_val, n_targets), original units
    history: list[dict[str, float]] = field(default_factory=list)


def stage_score(stage_name: str, y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The stage's validation metrics in original units: weighted R² (main) or mean R² of NDVI/Height (aux)."""
    per = per_target_r2(y, p, STAGE_TARGETS[stage_name])
    out = {f"r2/{k}": v for k, v in per.items()}
    out["score"] = weighted_r2(y, p) if stage_name == "main" else float(np.mean(list(per.values())))
    return out


def fit_scalers(stage_name: str, stage: StageConfig, table, train_idx: np.ndarray) -> dict[str, Scaler]:
    """Per-fold StandardScalers fitted on the fold's training images only."""
    y = table[list(STAGE_TARGETS[stage_name])].to_numpy(np.float64)[train_idx]
    scalers = {"targets": Scaler.fit(y, log1p=stage.targets.transform == "log1p" and stage_name == "main")}
    if STAGE_INPUTS[stage_name]:
        scalers["tabular"] = Scaler.fit(table[list(STAGE_INPUTS[stage_name])].to_numpy(np.float64)[train_idx])
    return scalers


def per_process_batch(global_batch: int, num_processes: int, key: str) -> int:
    """`train.batch_size` is the global batch: N processes take batch/N each, so the optimisation (steps, images
    per step, learning rate) is the same whatever the process count."""
    if global_batch % num_processes:
        from biomass.errors import ConfigError

        raise ConfigError(f"{key}={global_batch} is the global batch and must divide among {num_processes} processes")
    return global_batch // num_processes


def make_loader(reader: Reader, index: np.ndarray, tabular: np.ndarray, targets: np.ndarray | None,
                stage: StageConfig, seed: int, train: bool, num_workers: int, num_processes: int = 1) -> DataLoader:
    augment = build_augment(stage.augment.train if train else stage.augment.val)
    dataset = ImageDataset(lambda i: reader(int(index[i])), len(index), tabular[index],
                           None if targets is None else targets[index], augment, seed, stage.image.layout)
    if train:
        batch = per_process_batch(stage.train.batch_size, num_processes, "train.batch_size")
    else:  # evaluation batches only bound memory: round up instead of insisting on divisibility
        batch = max(1, -(-(stage.train.eval_batch_size or 2 * stage.train.batch_size) // num_processes))
    return DataLoader(dataset, batch_size=batch, sampler=EpochSampler(len(index), seed, shuffle=train),
                      drop_last=train and stage.train.drop_last and len(index) > batch, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)


def make_optimizer(model: torch.nn.Module, stage: StageConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # frozen tensors get no optimizer state
    fused = stage.optim.fused if stage.optim.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(params, lr=stage.optim.lr, weight_decay=stage.optim.weight_decay,
                             betas=stage.optim.betas, eps=stage.optim.eps, fused=fused or None)


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`runtime.compile`: torch.compile the model accelerate prepared, i.e. after any DDP wrap, where accelerate's
    own dynamo plugin compiles; a model accelerate compiled already (its dynamo config) is returned as it is.

    Not the plugin itself: it lives in accelerate's process-wide state, fixed by the first Accelerator, so it could
    not follow one experiment's config when several run in a process. Checkpoints are written from
    `unwrap(accelerator, model)`, the plain module, so their keys carry no `_orig_mod.` prefix.
    """
    from accelerate.utils import is_compiled_module

    if not enabled or is_compiled_module(model):
        return model
    return torch.compile(model)


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers: its state_dict keys are the model's own."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def train_one_epoch(accelerator: Accelerator, model, loader, loss_fn, optimizer, stage: StageConfig,
                    progress=None) -> float:
    model.train()
    total = torch.zeros((), device=accelerator.device)
    steps = 0
    accum = stage.train.grad_accum
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
            if stage.train.grad_clip:
                accelerator.clip_grad_norm_(params, stage.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.detach()  # stays on the device: no host sync inside the loop
        steps += 1
        if progress is not None:
            progress()
    mean = accelerator.reduce(total / max(steps, 1), reduction="mean")
    return float(mean.item())


def build_stage_model(stage_name: str, stage: StageConfig, load_weights: bool = True
                      ) -> tuple[BiomassModel, torch.nn.Module]:
    """A stage's model and loss: the loss decides how many raw outputs each target gets (quantiles: several)."""
    loss = LOSSES.build(stage.loss["name"], len(STAGE_TARGETS[stage_name]),
                        **{k: v for k, v in stage.loss.items() if k != "name"})
    model = build_model(stage, len(STAGE_TARGETS[stage_name]), len(STAGE_INPUTS[stage_name]), loss.outputs_per_target,
                        load_weights=load_weights)
    return model, loss


def views(x: torch.Tensor, names: Sequence[str]):
    """The TTA views of a batch: none, hflip (last axis), vflip (rows) or hvflip."""
    for name in names:
        y = x
        if name in ("hflip", "hvflip"):
            y = y.flip(-1)
        if name in ("vflip", "hvflip"):
            y = y.flip(-2)
        yield y


@torch.inference_mode()
def predict_raw(accelerator: Accelerator, model, loader, tabular_override: np.ndarray | None = None,
                flips: tuple[str, ...] = ("none",)) -> tuple[np.ndarray, np.ndarray]:
    """Raw outputs for every image of the loader, gathered across processes (each image exactly once), ordered
    by dataset index; averaged over the flip views."""
    model.eval()
    outs, idx = [], []
    for batch in loader:
        image, tab = batch["image"], batch["tabular"]
        if tabular_override is not None:
            tab = torch.as_tensor(tabular_override[batch["index"].cpu().numpy()], dtype=torch.float32,
                                  device=image.device)
        raw = torch.stack([model(x, tab).float() for x in views(image, flips)]).mean(0)
        raw, index = accelerator.gather_for_metrics((raw, batch["index"]))
        outs.append(raw.cpu())
        idx.append(index.cpu())
    raw = torch.cat(outs).numpy()
    index = torch.cat(idx).numpy()
    order = np.argsort(index, kind="stable")
    return raw[order], index[order]


def validate(accelerator, model, loader, loss_fn, targets_std: np.ndarray, y_true: np.ndarray,
             scaler: Scaler, stage_name: str) -> tuple[dict[str, float], np.ndarray]:
    raw, index = predict_raw(accelerator, model, loader)
    raw_t = torch.as_tensor(raw)
    loss = float(loss_fn.cpu()(raw_t, torch.as_tensor(targets_std[index], dtype=torch.float32)))
    loss_fn.to(accelerator.device)
    pred = scaler.inverse(loss_fn.cpu().point(raw_t).numpy())
    loss_fn.to(accelerator.device)
    metrics = {"loss": loss, **stage_score(stage_name, y_true[index], pred)}
    return metrics, pred


def save_checkpoint(model: torch.nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """safetensors weights + JSON metadata (scalers, epoch, scores), each written to a temp name then renamed."""
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    save_model(model, str(tmp))  # handles the consistent head's shared buffers
    os.replace(tmp, path)
    write_json(path.with_suffix(".json"), meta)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def save_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               progress: dict[str, Any]) -> None:
    """Model, optimizer and scheduler state plus training progress: safetensors + JSON, no pickles. The JSON is
    written last, so a state whose JSON exists is complete (a kill mid-save leaves the previous epoch's JSON)."""
    from safetensors.torch import save_file, save_model

    state_dir.mkdir(parents=True, exist_ok=True)
    epoch = progress["epoch"]
    save_model(model, str(state_dir / f"model-{epoch}.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{name}": value.detach().cpu().contiguous() for pid, st in opt["state"].items() for name, value in st.items()
               if isinstance(value, torch.Tensor)}
    save_file(tensors, str(state_dir / f"optimizer-{epoch}.safetensors"))
    meta = {"param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(), "progress": progress}
    write_json(state_dir / "progress.json", meta)
    for old in state_dir.glob("*.safetensors"):  # keep only the epoch the JSON points to
        if not old.stem.endswith(f"-{epoch}"):
            old.unlink(missing_ok=True)


def load_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    from safetensors.torch import load_file, load_model

    meta = json.loads((state_dir / "progress.json").read_text())
    epoch = meta["progress"]["epoch"]
    load_model(model, str(state_dir / f"model-{epoch}.safetensors"), device=str(next(model.parameters()).device))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(state_dir / f"optimizer-{epoch}.safetensors")).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta["progress"]


def improved(metrics: dict[str, float], best: dict[str, float] | None, select_by: str) -> bool:
    if best is None:
        return True
    if select_by == "val_loss":
        return metrics["loss"] < best["loss"]
    return metrics["score"] > best["score"]


def fit_fold(accelerator: Accelerator, *, stage_name: str, stage: StageConfig, table, reader: Reader, fold: int,
             train_idx: np.ndarray, val_idx: np.ndarray, seed: int, num_workers: int, ckpt_path: Path,
             init_state: dict[str, torch.Tensor] | None = None, log=None, progress=None,
             extra_meta: dict[str, Any] | None = None, state_dir: Path | None = None,
             compile_model: bool = False) -> FoldResult:
    """Train one fold; keep the best epoch's checkpoint at `ckpt_path` and return its validation predictions.

    With `state_dir`, the full training state is saved after every epoch and, when present, training resumes from
    it: the result equals an uninterrupted run's, since data order, augmentation and dropout draws are functions of
    (seed, fold, epoch) and everything else is in the state. `compile_model`: torch.compile it (`runtime.compile`).
    """
    scalers = fit_scalers(stage_name, stage, table, train_idx)
    y_all = table[list(STAGE_TARGETS[stage_name])].to_numpy(np.float64)
    y_std = scalers["targets"].transform(y_all).astype(np.float32)
    x_tab = (scalers["tabular"].transform(table[list(STAGE_INPUTS[stage_name])].to_numpy(np.float64))
             if "tabular" in scalers else np.zeros((len(table), 0))).astype(np.float32)

    torch.manual_seed(draw_seed(seed, fold, 1))  # same initial weights on every process and every run
    model, loss_fn = build_stage_model(stage_name, stage)
    if init_state is not None:
        missing = model.backbone.load_state_dict(init_state, strict=False)
        if missing.missing_keys:
            raise RuntimeError(f"init_from checkpoint lacks backbone keys, e.g. {missing.missing_keys[0]}")
    model.target_space.fit(scalers["targets"], y_std[train_idx])

    n_proc = accelerator.num_processes
    train_loader = make_loader(reader, train_idx, x_tab, y_std, stage, draw_seed(seed, fold, 2), True, num_workers,
                               n_proc)
    val_loader = make_loader(reader, val_idx, x_tab, y_std, stage, draw_seed(seed, fold, 3), False, num_workers,
                             n_proc)
    optimizer = make_optimizer(model, stage, accelerator.device)
    sched_cfg = dict(stage.scheduler)
    scheduler = SCHEDULERS.build(sched_cfg.pop("name"), optimizer, stage.train.epochs, **sched_cfg)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    model = maybe_compile(model, compile_model)
    loss_fn.to(accelerator.device)

    y_val = y_all[val_idx]
    progress_state: dict[str, Any] = {"epoch": -1, "best": None, "best_epoch": -1, "best_pred": None, "stale": 0,
                                      "history": []}
    if state_dir is not None and (state_dir / "progress.json").is_file():  # resume after the last saved epoch
        progress_state = load_state(state_dir, unwrap(accelerator, model), optimizer, scheduler)
    best, best_epoch, stale, history = (progress_state["best"], progress_state["best_epoch"], progress_state["stale"],
                                        progress_state["history"])
    best_pred = None if progress_state["best_pred"] is None else np.asarray(progress_state["best_pred"])
    finished = stage.train.patience is not None and stale >= stage.train.patience
    for epoch in range(progress_state["epoch"] + 1, 0 if finished else stage.train.epochs):
        # Dropout draws from torch's RNG: seed it per epoch, so a resumed epoch draws what the original did.
        torch.manual_seed(draw_seed(seed, fold, 4, epoch))
        train_loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(accelerator, model, train_loader, loss_fn, optimizer, stage, progress)
        metrics, pred = validate(accelerator, model, val_loader, loss_fn, y_std[val_idx], y_val,
                                 scalers["targets"], stage_name)
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
            raise FloatingPointError(f"{stage_name} fold {fold}: training loss is {train_loss} at epoch {epoch}")
        if improved(metrics, best, stage.train.select_by):
            best, best_epoch, best_pred, stale = metrics, epoch, pred, 0
            if accelerator.is_main_process:
                meta = {"stage": stage_name, "fold": fold, "epoch": epoch, "metrics": metrics,
                        "targets": list(STAGE_TARGETS[stage_name]), "inputs": list(STAGE_INPUTS[stage_name]),
                        "scalers": {k: s.to_dict() for k, s in scalers.items()},
                        "train_images": int(len(train_idx)), "val_images": int(len(val_idx)), **(extra_meta or {})}
                save_checkpoint(unwrap(accelerator, model), ckpt_path, meta)
        else:
            stale += 1
        if state_dir is not None and accelerator.is_main_process:
            save_state(state_dir, unwrap(accelerator, model), optimizer, scheduler,
                       {"epoch": epoch, "best": best, "best_epoch": best_epoch, "best_pred": best_pred.tolist(),
                        "stale": stale, "history": history})
        accelerator.wait_for_everyone()
        if stage.train.patience and stale >= stage.train.patience:
            break
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    assert best is not None and best_pred is not None
    return FoldResult(fold, best_epoch, best, np.asarray(val_idx), best_pred, history)
