"""Write a Kaggle submission: `accelerate launch -m biomass.infer RUN_DIR --data DATA_DIR [--out submission.csv]`.

Also `python -m biomass.infer ...`. For every test image: the aux folds predict NDVI and Height (averaged in original
units); each main fold re-standardises them with its own scaler and predicts with TTA (`infer.tta`); the folds blend
with `infer.fold_weights`; inverse-scale; clip at 0; optionally project onto the mass balance. Each image is decoded
once and passes through every fold model, all resident on the device. With N processes each scores a shard of the
images (accelerate's split) and the predictions are gathered, so the file matches the single-process one.

The run directory is self-contained (config.yaml, fold checkpoints with their scalers): copy it to an offline machine
and run this there; the backbone weights file is not needed.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from biomass.config import ExperimentConfig, StageConfig, load_yaml, validate
from biomass.constants import TABULAR, TARGET_WEIGHTS, TARGETS
from biomass.data.scalers import Scaler
from biomass.data.table import check_images, read_test
from biomass.engine import build_stage_model, views
from biomass.errors import BiomassError, ConfigError, DataError, run_cli
from biomass.models.heads import FusionHead

FORMAT_VERSION = 1


@dataclass
class FoldModel:
    fold: int
    model: torch.nn.Module
    loss: torch.nn.Module  # for point(): which raw output is the prediction
    targets: Scaler
    tabular: Scaler | None


def uses_tabular(model: torch.nn.Module) -> bool:
    """Whether the model's head reads its tabular input (a fusion branch), or ignores it (image_only)."""
    return any(isinstance(m, FusionHead) and m.tabular is not None for m in model.modules())


def check_run_dir(run_dir: Path) -> ExperimentConfig:
    """A completed run of this format, with its config; anything else is a clear error."""
    if not run_dir.is_dir():
        raise BiomassError(f"run directory {run_dir} does not exist")
    status_file = run_dir / "run.json"
    if not status_file.is_file() or not (run_dir / "config.yaml").is_file():
        raise BiomassError(f"{run_dir} is not a biomass run directory (no run.json / config.yaml)")
    try:
        status = json.loads(status_file.read_text())
    except json.JSONDecodeError as err:
        raise BiomassError(f"{status_file}: not valid JSON ({err})") from None
    if status.get("format_version") != FORMAT_VERSION:
        raise BiomassError(f"{run_dir} was written by an incompatible biomass version "
                           f"(format {status.get('format_version')}, this version reads {FORMAT_VERSION})")
    if status.get("status") != "completed":
        raise BiomassError(f"{run_dir} did not complete (status: {status.get('status')}); finish or retrain it first")
    return validate(load_yaml(run_dir / "config.yaml"))


def expected_folds(run_dir: Path, stage_name: str, stage: StageConfig) -> list[int]:
    path = run_dir / "folds.csv"
    if not path.is_file():
        raise BiomassError(f"{run_dir}: folds.csv is missing; the run directory is incomplete")
    folds = pd.read_csv(path)
    if f"{stage_name}_fold" not in folds.columns:
        raise BiomassError(f"{path}: no column {stage_name + '_fold'!r}; it does not belong to this run's config.yaml")
    ids = folds[f"{stage_name}_fold"]
    return stage.folds.train_folds if stage.folds.train_folds is not None else sorted(set(ids.tolist()))


def check_checkpoints(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Every fold checkpoint the config expects is there, checked before any model is built."""
    for stage_name in ("main", "aux"):
        stage = getattr(cfg, stage_name)
        if stage is None:
            continue
        for k in expected_folds(run_dir, stage_name, stage):
            ckpt = run_dir / stage_name / f"fold{k}" / "best.safetensors"
            for f in (ckpt, ckpt.with_suffix(".json")):
                if not f.is_file():
                    raise BiomassError(f"{run_dir}: {stage_name} fold {k} checkpoint is missing "
                                       f"({f.relative_to(run_dir)})")


def load_fold_models(run_dir: Path, stage_name: str, stage: StageConfig, device: torch.device) -> list[FoldModel]:
    from safetensors.torch import load_model


    out = []
    for k in expected_folds(run_dir, stage_name, stage):
        ckpt = run_dir / stage_name / f"fold{k}" / "best.safetensors"
        if not ckpt.is_file() or not ckpt.with_suffix(".json").is_file():
            raise BiomassError(f"{run_dir}: {stage_name} fold {k} checkpoint is missing ({ckpt.relative_to(run_dir)})")
        meta = json.loads(ckpt.with_suffix(".json").read_text())
        model, loss = build_stage_model(stage_name, stage, load_weights=False)
        try:
            load_model(model, str(ckpt))
        except RuntimeError as err:
            raise BiomassError(f"{ckpt}: does not match the run's config.yaml ({str(err).splitlines()[0]})") from None
        scalers = meta["scalers"]
        # an image_only head ignores NDVI/Height: it needs no tabular scaler and no aux stage
        tabular = Scaler.from_dict(scalers["tabular"]) if "tabular" in scalers and uses_tabular(model) else None
        out.append(FoldModel(k, model.eval().to(device), loss.to(device), Scaler.from_dict(scalers["targets"]),
                             tabular))
    return out


def fold_weights(cfg: ExperimentConfig, run_dir: Path, folds: list[FoldModel]) -> np.ndarray:
    spec = cfg.infer.fold_weights
    if spec == "uniform":
        w = np.ones(len(folds))
    elif spec == "cv":  # proportional to each fold's validation score (negative scores get no weight)
        scores = json.loads((run_dir / "metrics.json").read_text())["folds"]["main"]
        w = np.array([max(scores[str(f.fold)]["score"], 0.0) for f in folds])
        if w.sum() == 0:
            w = np.ones(len(folds))
    else:
        w = np.asarray(spec, dtype=np.float64)
        if len(w) != len(folds):
            raise ConfigError(f"infer.fold_weights has {len(w)} values for {len(folds)} main folds")
    return w / w.sum()


def mass_balance(pred: np.ndarray, weights=TARGET_WEIGHTS) -> np.ndarray:
    """Nearest predictions (in the metric's weighted norm) with GDM = Green + Clover, Total = Green + Dead + Clover."""
    a = np.array([[1, 0, 1, -1, 0], [1, 1, 1, 0, -1]], dtype=np.float64)  # rows: constraints on TARGETS order
    w_inv = np.diag(1.0 / np.asarray(weights))
    correction = w_inv @ a.T @ np.linalg.solve(a @ w_inv @ a.T, a @ pred.T)
    return pred - correction.T


def _t(a: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)


@torch.inference_mode()
def predict_batch(image: torch.Tensor, aux: list[FoldModel], main: list[FoldModel], blend: torch.Tensor,
                  tta: list[str], aux_size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blended biomass predictions in grams (B, 5) and the aux NDVI/Height (B, 2) for one batch."""
    b = image.shape[0]
    tab = torch.zeros((b, 0), device=image.device)
    aux_pred = None
    if aux:
        x = image
        if aux_size is not None:  # aux trained at another size: resize on the device
            x = F.interpolate(image.float(), size=aux_size, mode="bilinear", antialias=True, align_corners=False)
        per_fold = []
        for f in aux:
            raw = f.loss.point(f.model(x, tab).float())
            per_fold.append(raw * _t(f.targets.scale, x.device) + _t(f.targets.mean, x.device))
        aux_pred = torch.stack(per_fold).mean(0)  # averaged in original units
    out = torch.zeros((b, len(TARGETS)), device=image.device)
    for w, f in zip(blend, main):
        t = tab if f.tabular is None else (aux_pred - _t(f.tabular.mean, image.device)) / _t(f.tabular.scale,
                                                                                                image.device)
        raw = torch.stack([f.model(v, t).float() for v in views(image, tta)]).mean(0)
        std = f.loss.point(raw)
        grams = std * _t(f.targets.scale, image.device) + _t(f.targets.mean, image.device)
        if f.targets.log1p:
            grams = torch.expm1(grams)
        out += w * grams
    return out, aux_pred


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biomass.infer", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="folder with test.csv and test/ (Kaggle layout)")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"))
    parser.add_argument("--batch-size", type=int, help="default: the config's infer.batch_size")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    infer(args.run_dir.resolve(), args.data.resolve(), args.out, args.batch_size)
    return 0


def infer(run_dir: Path, data_dir: Path, out: Path, batch_size: int | None = None) -> pd.DataFrame:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from biomass.data.cache import make_reader
    from biomass.data.images import EpochSampler, ImageDataset, build_augment

    cfg = check_run_dir(run_dir)
    check_checkpoints(run_dir, cfg)
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir} does not exist")
    rows, images = read_test(data_dir, cfg.data.test_csv)
    sizes = check_images(data_dir, images["image_path"], cfg.data.check_images)

    accelerator = Accelerator()
    device = accelerator.device
    main_stage, aux_stage = cfg.main, cfg.aux
    main = load_fold_models(run_dir, "main", main_stage, device)
    aux = load_fold_models(run_dir, "aux", aux_stage, device) if aux_stage is not None else []
    if main[0].tabular is not None and not aux:
        raise ConfigError("the main model needs NDVI and Height, which test.csv lacks, and this run has no aux stage "
                          "to predict them; train with an aux stage or an image_only head")
    if aux and aux_stage.image.layout != main_stage.image.layout:
        raise ConfigError("inference needs main.image.layout and aux.image.layout to match")
    aux_size = tuple(aux_stage.image.size) if aux and aux_stage.image.size != main_stage.image.size else None
    blend = torch.as_tensor(fold_weights(cfg, run_dir, main), dtype=torch.float32, device=device)

    # Test images are used uncropped, as the seed did: the crop boxes were a training-time clean-up.
    reader = make_reader(cfg.data.cache_dir, data_dir, list(images["image_path"]), tuple(main_stage.image.size),
                         None, sizes, main_stage.image.layout)
    dataset = ImageDataset(reader, len(images), np.zeros((len(images), 0)), None, build_augment([]), 0,
                           main_stage.image.layout)
    bs = batch_size or cfg.infer.batch_size
    loader = accelerator.prepare(DataLoader(dataset, batch_size=bs, sampler=EpochSampler(len(images), 0, False),
                                            num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available()))
    start = time.time()
    preds, aux_preds, idx = [], [], []
    from biomass.train import Progress
    from biomass.run import _progress_enabled

    with Progress(_progress_enabled() and accelerator.is_main_process) as progress:
        task = progress.task("inference batches", len(loader))
        for batch in loader:
            with accelerator.autocast():
                pred, aux_pred = predict_batch(batch["image"], aux, main, blend, list(cfg.infer.tta), aux_size)
            if aux_pred is None:
                aux_pred = torch.full((pred.shape[0], len(TABULAR)), float("nan"), device=pred.device)
            pred, aux_pred, index = accelerator.gather_for_metrics((pred, aux_pred, batch["index"]))
            preds.append(pred.cpu())
            aux_preds.append(aux_pred.cpu())
            idx.append(index.cpu())
            progress.advance(task)
    seconds = time.time() - start
    index = torch.cat(idx).numpy()
    order = np.argsort(index, kind="stable")
    pred = torch.cat(preds).numpy().astype(np.float64)[order]
    if not np.array_equal(index[order], np.arange(len(images))):
        raise RuntimeError("inference did not score every test image exactly once")
    if cfg.infer.mass_balance:
        pred = mass_balance(pred)
    pred = np.clip(pred, 0.0, None)
    by_image = dict(zip(images["image_path"], pred))
    col = {t: j for j, t in enumerate(TARGETS)}
    submission = pd.DataFrame({"sample_id": rows["sample_id"].to_numpy(),
                               "target": [by_image[p][col[t]] for p, t in zip(rows["image_path"],
                                                                               rows["target_name"])]})
    if accelerator.is_main_process:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        submission.to_csv(tmp, index=False, float_format="%.6f")
        os.replace(tmp, out)
        n_models = len(main) * len(cfg.infer.tta) + len(aux)
        accelerator.print(f"{len(images)} images x {n_models} model passes in {seconds:.1f} s "
                          f"({len(images) / max(seconds, 1e-9):.2f} images/s on {accelerator.num_processes} "
                          f"process(es)) -> {out}")
    accelerator.end_training()
    return submission


if __name__ == "__main__":
    run_cli(main)
