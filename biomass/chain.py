"""THE aux -> main chain: one implementation for the deployable CV and for test-time inference.

For a set of images: the aux fold models predict NDVI and Height (each model on the rows assigned to it, averaged
in original units); each main fold model re-standardises them with its own scaler and predicts biomass with TTA;
the folds blend per row with their weights; then the post-processing (mass balance, clip at 0). Which fold models
see which rows is the caller's choice: every model sees every test image at inference, and each training image is
seen only by the models of the folds that held it out in the deployable CV.

Fold models are loaded one at a time, aux folds then main folds, each freed before the next, so peak device memory
is one model plus a batch. Crop policy, TTA views and post-processing are the `infer` settings of the config, read
here alone (`ChainSettings`).
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from biomass.config.schema import ExperimentConfig, StageConfig, TestTimeTraining
from biomass.constants import TARGET_WEIGHTS
from biomass.data.images import EpochSampler, ImageDataset, Reader, build_augment
from biomass.data.scalers import Scaler
from biomass.data.source import ImageSet
from biomass.engine.build import build_stage_model
from biomass.engine.checkpoint import load_checkpoint
from biomass.engine.loop import gather_predictions
from biomass.errors import BiomassError, ConfigError
from biomass.models.heads import FusionHead
from biomass.models.model import BiomassModel
from biomass.post import project_mass_balance
from biomass.registry import POSTS
from biomass.rundir import RunDir
from biomass.stages import AUX, MAIN, Stage
from biomass.ttt import Labelled, finetune

Assignment = dict[int, np.ndarray]  # fold -> rows of the image set that fold's model predicts


@dataclass(frozen=True)
class ChainSettings:
    crop: str  # "none": every stage sees uncropped images; "boxes": each stage framed as it trained
    tta: tuple[str, ...]  # main-stage TTA views (the aux stage predicts without TTA, as the seed)
    mass_balance: bool
    clip: bool
    post: tuple[dict, ...] = ()  # infer.post: post-processing steps (biomass.post), after mass_balance
    ttt: TestTimeTraining | None = None  # infer.ttt: the optional third stage (biomass.ttt)

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> ChainSettings:
        return cls(cfg.infer.crop, tuple(cfg.infer.tta), cfg.infer.mass_balance, cfg.infer.clip,
                   tuple(cfg.infer.post), cfg.infer.ttt)

    def crops(self, stage_cfg: StageConfig) -> bool:
        """Whether this stage's images are cropped to their boxes in the chain."""
        return self.crop == "boxes" and stage_cfg.image.crop


def needs_boxes(cfg: ExperimentConfig) -> bool:
    settings = ChainSettings.of(cfg)
    return any(settings.crops(c) for c in (cfg.main, cfg.aux) if c is not None)


@dataclass
class FoldModel:
    fold: int
    model: BiomassModel
    tabular: Scaler | None  # None: the head ignores NDVI/Height (image_only)


def uses_tabular(model: torch.nn.Module) -> bool:
    """Whether the model's head reads its tabular input (a fusion branch), or ignores it (image_only)."""
    return any(isinstance(m, FusionHead) and m.tabular is not None for m in model.modules())


def load_fold_model(run: RunDir, stage: Stage, stage_cfg: StageConfig, fold: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> FoldModel:
    meta = run.checkpoint_info(stage, fold)
    base = meta.get("base_weights")  # a PEFT checkpoint: adapters + head; the backbone from its weights file
    if base is not None:
        path = Path(base["path"])
        if not path.is_file() or path.stat().st_size != base["bytes"]:
            raise BiomassError(f"{run.checkpoint(stage, fold)}: a PEFT checkpoint on the base weights {path}, which "
                               "is missing or not the file it trained on; put that file there")
        stage_cfg = stage_cfg.model_copy(deep=True)
        stage_cfg.model.backbone["weights"] = str(path)
    model, _ = build_stage_model(stage, stage_cfg, load_weights=base is not None)
    load_checkpoint(model, run.checkpoint(stage, fold), partial=base is not None)
    scalers = meta["scalers"]
    tabular = Scaler.from_dict(scalers["tabular"]) if "tabular" in scalers and uses_tabular(model) else None
    model = model.eval().to(device=device, dtype=dtype)
    model.target_space.float()  # predictions leave the model in fp32 units whatever the weights' dtype
    return FoldModel(fold, model, tabular)


def views(x: torch.Tensor, names: Sequence[str]):
    """The TTA views of a batch: none, hflip (last axis), vflip (rows) or hvflip."""
    for name in names:
        y = x
        if name in ("hflip", "hvflip"):
            y = y.flip(-1)
        if name in ("vflip", "hvflip"):
            y = y.flip(-2)
        yield y


def stage_reader(images: ImageSet, cfg: ExperimentConfig, stage_cfg: StageConfig, in_memory: bool = False,
                 memo: dict | None = None) -> Reader:
    """The stage's images framed as the chain sees them. `in_memory`: decode each image once and keep it (every
    fold model reads every image at inference); `memo` shares one decoding between stages that frame alike."""
    from biomass.data.cache import MemoryReader

    crop = ChainSettings.of(cfg).crops(stage_cfg)
    key = (tuple(stage_cfg.image.size), crop, stage_cfg.image.layout)
    if memo is not None and key in memo:
        return memo[key]
    reader = images.reader(stage_cfg.image.size, crop, stage_cfg.image.layout, cfg.data.cache_dir)
    if in_memory and cfg.data.cache_dir is None and len(images):
        reader = MemoryReader(reader, len(images))
    if memo is not None:
        memo[key] = reader
    return reader


def predict_fold(accelerator: Accelerator, fm: FoldModel, reader: Reader, rows: np.ndarray,
                 tabular: np.ndarray | None, tta: Sequence[str], batch_size: int) -> np.ndarray:
    """One fold model's (len(rows), n_targets) predictions in original units, TTA views averaged in its raw output
    space. `tabular`: NDVI/Height of the rows in original units (the fold model's own scaler standardises them)."""
    if fm.tabular is not None:
        if tabular is None or np.isnan(tabular).any():
            raise ConfigError("the main model needs NDVI and Height, which test.csv lacks, and this run has no "
                              "aux stage to predict them; train with an aux stage or an image_only head")
        tab = fm.tabular.transform(tabular).astype(np.float32)
    else:
        tab = np.zeros((len(rows), 0), np.float32)
    dataset = ImageDataset(lambda i: reader(int(rows[i])), len(rows), tab, None, build_augment([]), 0)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(rows), 0, False),
                                            num_workers=0, pin_memory=torch.cuda.is_available()))
    model = fm.model.eval()

    def forward(batch):
        raw = torch.stack([model(v, batch["tabular"]).float() for v in views(batch["image"], tta)]).mean(0)
        return model.target_space.to_original(model.point(raw))

    pred, index = gather_predictions(accelerator, loader, forward)
    if not np.array_equal(index, np.arange(len(rows))):
        raise RuntimeError(f"fold {fm.fold}: inference did not score every image exactly once")
    return pred.astype(np.float64)


def predict_stage(accelerator: Accelerator, run: RunDir, cfg: ExperimentConfig, stage: Stage, reader: Reader,
                  n_images: int, assignment: Assignment, tabular: np.ndarray | None = None,
                  tta: Sequence[str] = ("none",), weights: dict[int, float] | None = None,
                  batch_size: int | None = None, progress=None, check_finite: bool = False,
                  image_names: Sequence[str] = (), adapt: Callable[[FoldModel, np.ndarray], None] | None = None
                  ) -> np.ndarray:
    """(n_images, n_targets) predictions in original units: each row the weighted mean over the fold models
    assigned to it (NaN where none is). `tabular`: NDVI/Height in original units for a stage that reads them.
    `check_finite`: a fold model that predicts NaN or inf for any image is an error naming it (test time).
    `adapt(fold_model, rows)`: changes each fold model (loaded in fp32) before it predicts its rows (infer.ttt)."""
    stage_cfg = stage.config(cfg)
    out = np.zeros((n_images, len(stage.targets)))
    total = np.zeros(n_images)
    for fold, rows in assignment.items():
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            continue
        fm = load_fold_model(run, stage, stage_cfg, fold, accelerator.device,
                             torch.float32 if adapt is not None else getattr(torch, cfg.infer.weights_dtype))
        if adapt is not None:
            adapt(fm, rows)
        pred = predict_fold(accelerator, fm, reader, rows, None if tabular is None else tabular[rows], tta,
                            batch_size or cfg.infer.batch_size)
        if check_finite:
            require_finite(pred, f"{run.checkpoint(stage, fold)}: {stage.name} fold {fold}"
                           f"{' after infer.ttt fine-tuning' if adapt is not None else ''}", rows, image_names, tta)
        w = 1.0 if weights is None else float(weights[fold])
        out[rows] += w * pred
        total[rows] += w
        del fm, pred  # the fold model goes before the next one loads
        gc.collect()
        accelerator.free_memory()
        if progress is not None:
            progress()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total[:, None] > 0, out / np.where(total > 0, total, 1.0)[:, None], np.nan)


def require_finite(pred: np.ndarray, who: str, rows: np.ndarray, image_names: Sequence[str],
                   tta: Sequence[str]) -> None:
    if np.isfinite(pred).all():
        return
    bad = int(np.flatnonzero(~np.isfinite(pred).all(axis=1))[0])
    raise BiomassError(f"{who} predicts a non-finite value ({pred[bad].tolist()}) for image "
                       f"{image_names[rows[bad]]!r} with infer.tta={list(tta)}; no submission written (the checkpoint "
                       "is damaged or its training diverged: retrain that fold)")


def mass_balance(pred: np.ndarray, weights=TARGET_WEIGHTS) -> np.ndarray:
    """Nearest predictions (in the metric's weighted norm) with GDM = Green + Clover, Total = Green + Dead + Clover."""
    return project_mass_balance(pred, weights)


def postprocess(pred: np.ndarray, settings: ChainSettings) -> np.ndarray:
    """infer.mass_balance, then the infer.post steps in order, then infer.clip: the one place this runs."""
    if settings.mass_balance:
        pred = mass_balance(pred)
    for node in settings.post:
        pred = POSTS.build_node(node)(pred)
    if settings.clip:
        pred = np.clip(pred, 0.0, None)
    return pred


def run_chain(accelerator: Accelerator, run: RunDir, cfg: ExperimentConfig, images: ImageSet,
              aux: Assignment | None, main: Assignment, main_weights: dict[int, float] | None = None,
              in_memory: bool = False, batch_size: int | None = None, progress=None, check_finite: bool = False,
              labelled: Labelled | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Biomass predictions (n, 5) in grams after post-processing, and the aux NDVI/Height (n, 2) or None.

    `aux`/`main` assign rows to fold models; a main row whose aux prediction is missing is not predicted (NaN).
    `check_finite` (test time): a fold model's non-finite prediction is an error naming the fold and the image.
    `labelled`: the training images, which `infer.ttt` fine-tunes on beside the pseudo-labelled ones.
    """
    settings = ChainSettings.of(cfg)
    memo: dict = {}
    n = len(images)
    aux_pred = None
    if cfg.aux is not None and aux is not None:
        reader = stage_reader(images, cfg, cfg.aux, in_memory, memo)
        aux_pred = predict_stage(accelerator, run, cfg, AUX, reader, n, aux, batch_size=batch_size,
                                 progress=progress, check_finite=check_finite, image_names=images.image_paths)
        main = {k: rows[~np.isnan(aux_pred[rows]).any(axis=1)] for k, rows in main.items()}
    reader = stage_reader(images, cfg, cfg.main, in_memory, memo)
    pred = predict_stage(accelerator, run, cfg, MAIN, reader, n, main, tabular=aux_pred, tta=settings.tta,
                         weights=main_weights, batch_size=batch_size, progress=progress, check_finite=check_finite,
                         image_names=images.image_paths)
    ok = ~np.isnan(pred).any(axis=1)
    pred[ok] = postprocess(pred[ok], settings)
    if settings.ttt is not None:
        if labelled is None:
            raise ValueError("infer.ttt needs the training images (`labelled`)")
        pred = test_time_train(accelerator, run, cfg, reader, main, main_weights, pred, aux_pred, labelled,
                               images.image_paths, batch_size, progress, check_finite)
    return pred, aux_pred


def test_time_train(accelerator: Accelerator, run: RunDir, cfg: ExperimentConfig, reader: Reader, main: Assignment,
                    main_weights: dict[int, float] | None, chain: np.ndarray, aux_pred: np.ndarray | None,
                    labelled: Labelled, image_names: Sequence[str], batch_size: int | None = None, progress=None,
                    check_finite: bool = False) -> np.ndarray:
    """`infer.ttt`: each main fold model, fine-tuned on its training images + its rows pseudo-labelled with the chain's
    predictions (`chain`, NDVI/Height from the aux stage), predicts those rows again; the folds blend as in the chain,
    are post-processed alike, and the result is (1 - blend) * chain + blend * fine-tuned. Models one at a time."""
    settings = ChainSettings.of(cfg)
    main = {k: rows[np.isfinite(chain[rows]).all(axis=1)] for k, rows in main.items()}

    def adapt(fm: FoldModel, rows: np.ndarray) -> None:
        # in name order: the fine-tuning's batches do not depend on how the caller ordered its images (the CV's
        # held-out rows and the same images as a test set then train alike)
        rows = rows[np.argsort([image_names[r] for r in rows], kind="stable")]
        fm.model = finetune(accelerator, cfg, fm.model, fm.tabular, fm.fold, labelled, reader, rows,
                            None if aux_pred is None else aux_pred[rows], chain[rows])

    tuned = predict_stage(accelerator, run, cfg, MAIN, reader, len(chain), main, tabular=aux_pred, tta=settings.tta,
                          weights=main_weights, batch_size=batch_size, progress=progress,
                          check_finite=check_finite, image_names=image_names, adapt=adapt)
    ok = ~np.isnan(tuned).any(axis=1)
    tuned[ok] = postprocess(tuned[ok], settings)
    blend = settings.ttt.blend
    return (1.0 - blend) * chain + blend * tuned


def fold_weights(cfg: ExperimentConfig, run: RunDir, folds: list[int]) -> dict[int, float]:
    """The main folds' blend weights at inference, normalised to sum to 1."""
    spec = cfg.infer.fold_weights
    if spec == "uniform":
        w = np.ones(len(folds))
    elif spec == "cv":  # proportional to each fold's validation score (negative scores get no weight)
        scores = run.metrics().get("folds", {}).get("main", {})
        missing = [k for k in folds if str(k) not in scores]
        if missing:
            raise BiomassError(f"{run / 'metrics.json'}: no score for main fold {missing[0]} (infer.fold_weights=cv)")
        w = np.array([max(scores[str(k)]["score"], 0.0) for k in folds])
        if w.sum() == 0:
            w = np.ones(len(folds))
    else:
        w = np.asarray(spec, dtype=np.float64)
        if len(w) != len(folds):
            raise ConfigError(f"infer.fold_weights has {len(w)} values for {len(folds)} main folds")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"infer.fold_weights must be finite, non-negative and sum above 0, got {list(spec)}")
    return dict(zip(folds, (w / w.sum()).tolist()))


def every_fold(folds: list[int], n: int) -> Assignment:
    """Test time: every fold model predicts every image."""
    return {k: np.arange(n) for k in folds}


def held_out(fold_ids: np.ndarray, folds: list[int]) -> Assignment:
    """The deployable CV: each fold model predicts only the images its fold held out."""
    return {k: np.flatnonzero(fold_ids == k) for k in folds}


__all__ = ["ChainSettings", "FoldModel", "every_fold", "fold_weights", "held_out", "mass_balance",
           "needs_boxes", "postprocess", "predict_fold", "predict_stage", "run_chain", "test_time_train", "views"]
