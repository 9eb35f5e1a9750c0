"""THE aux -> main chain: one implementation for the deployable CV and for test-time inference.

For a set of images: the aux fold models predict NDVI and Height (each model on the rows assigned to it, averaged
in original units); each main fold model re-standardises them with its own scaler and predicts biomass with TTA;
the folds blend per row with their weights; then the post-processing (`infer.post`, clip at 0), and with
`infer.ttt` the test-time-trained blend. Which fold models see which rows is the caller's `Assignment`: every model
sees every test image at inference, and each training image is seen only by the models of the folds that held it
out in the deployable CV.

`Chain` is built once per run directory and config; fold models are loaded one at a time, aux folds then main
folds, each freed before the next, so peak device memory is one model plus a batch. Crop policy, TTA views and
post-processing are the `infer` settings of the config, read here alone (`ChainSettings`).
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from biomass.config.schema import ExperimentConfig, TestTimeTraining
from biomass.data.images import EpochSampler, ImageDataset, Reader, build_augment
from biomass.data.scalers import Scaler
from biomass.data.source import ImageSet
from biomass.engine.build import build_stage_model
from biomass.engine.checkpoint import load_checkpoint
from biomass.engine.loop import gather_predictions
from biomass.errors import BiomassError, ConfigError
from biomass.models.heads import FusionHead
from biomass.models.model import BiomassModel
from biomass.registry import POSTS
from biomass.rundir import RunDir
from biomass.stages import AUX, MAIN, Stage, configured
from biomass.ttt import Labelled, Pseudo, finetune


@dataclass(frozen=True)
class ChainSettings:
    crop: str  # "none": every stage sees uncropped images; "boxes": each stage framed as it trained
    tta: tuple[str, ...]  # main-stage TTA views (the aux stage predicts without TTA, as the seed)
    clip: bool
    post: tuple[dict, ...] = ()  # infer.post: post-processing steps (biomass.post), in order, before the clip
    ttt: TestTimeTraining | None = None  # infer.ttt: the optional third stage (biomass.ttt)

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> ChainSettings:
        return cls(cfg.infer.crop, tuple(cfg.infer.tta), cfg.infer.clip, tuple(cfg.infer.post), cfg.infer.ttt)


@dataclass(frozen=True)
class Assignment:
    """Which fold models predict which rows of an image set: fold -> rows, for each stage (aux None: none)."""

    main: dict[int, np.ndarray]
    aux: dict[int, np.ndarray] | None = None

    @classmethod
    def every_fold(cls, main_folds: list[int], aux_folds: list[int] | None, n: int) -> Assignment:
        """Test time: every fold model predicts every image."""
        return cls({k: np.arange(n) for k in main_folds},
                   None if aux_folds is None else {k: np.arange(n) for k in aux_folds})

    @classmethod
    def held_out(cls, fold_ids: dict[Stage, np.ndarray], folds: dict[Stage, list[int]]) -> Assignment:
        """The deployable CV: each fold model predicts only the images its fold held out."""
        by_stage = {s: {k: np.flatnonzero(fold_ids[s] == k) for k in folds[s]} for s in folds}
        return cls(by_stage[MAIN], by_stage.get(AUX))

    def of(self, stage: Stage) -> dict[int, np.ndarray] | None:
        return self.main if stage is MAIN else self.aux


@dataclass
class FoldModel:
    fold: int
    model: BiomassModel
    tabular: Scaler | None  # None: the head ignores NDVI/Height (image_only)


def uses_tabular(model: torch.nn.Module) -> bool:
    """Whether the model's head reads its tabular input (a fusion branch), or ignores it (image_only)."""
    return any(isinstance(m, FusionHead) and m.tabular is not None for m in model.modules())


def views(x: torch.Tensor, names: Sequence[str]):
    """The TTA views of a batch: none, hflip (last axis), vflip (rows) or hvflip."""
    for name in names:
        y = x
        if name in ("hflip", "hvflip"):
            y = y.flip(-1)
        if name in ("vflip", "hvflip"):
            y = y.flip(-2)
        yield y


def postprocess(pred: np.ndarray, settings: ChainSettings) -> np.ndarray:
    """The infer.post steps in order, then infer.clip: the one place this runs."""
    for node in settings.post:
        pred = POSTS.build_node(node)(pred)
    if settings.clip:
        pred = np.clip(pred, 0.0, None)
    return pred


def fold_weights(cfg: ExperimentConfig, run: RunDir, folds: list[int]) -> dict[int, float]:
    """The main folds' blend weights at inference, normalised to sum to 1 (a list's length and values are checked
    when the config loads: biomass.config.rules)."""
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
    return dict(zip(folds, (w / w.sum()).tolist()))


@dataclass
class Chain:
    """The chain of one run directory and config. `predict(images, assignment)` runs it on an image set.

    `main_weights`: the main folds' blend weights (None: equal). `in_memory`: decode each image once and keep it
    (every fold model reads every image at inference). `check_finite` (test time): a fold model's non-finite
    prediction is an error naming the fold and the image. `labelled`: the training images, which `infer.ttt`
    fine-tunes on beside the pseudo-labelled ones. `tick`: called after each fold model (a progress bar)."""

    accelerator: Accelerator
    run: RunDir
    cfg: ExperimentConfig
    main_weights: dict[int, float] | None = None
    batch_size: int | None = None
    in_memory: bool = False
    check_finite: bool = False
    labelled: Labelled | None = None
    tick: Callable[[], None] | None = None
    settings: ChainSettings = field(init=False)

    def __post_init__(self) -> None:
        self.settings = ChainSettings.of(self.cfg)
        if self.settings.ttt is not None and self.labelled is None:
            raise ValueError("infer.ttt needs the training images (`labelled`)")

    # -------------------------------------------------------------------------------------------------- predict
    def predict(self, images: ImageSet, assignment: Assignment) -> tuple[np.ndarray, np.ndarray | None]:
        """Biomass predictions (n, 5) in grams after post-processing, and the aux NDVI/Height (n, 2) or None. A
        main row whose aux prediction is missing is not predicted (NaN)."""
        memo: dict = {}
        main, aux_pred = assignment.main, None
        if self.cfg.aux is not None and assignment.aux is not None:
            aux_pred = self.predict_stage(AUX, self.reader(images, AUX, memo), images, assignment.aux)
            main = {k: rows[~np.isnan(aux_pred[rows]).any(axis=1)] for k, rows in main.items()}
        reader = self.reader(images, MAIN, memo)
        pred = self.post(self.predict_stage(MAIN, reader, images, main, aux_pred))
        if self.settings.ttt is not None:
            pred = self.test_time_train(images, reader, main, pred, aux_pred)
        return pred, aux_pred

    def post(self, pred: np.ndarray) -> np.ndarray:
        ok = ~np.isnan(pred).any(axis=1)
        pred[ok] = postprocess(pred[ok], self.settings)
        return pred

    def reader(self, images: ImageSet, stage: Stage, memo: dict) -> Reader:
        """The stage's images framed as the chain sees them; `memo` shares one decoding between stages that frame
        alike."""
        from biomass.data.cache import MemoryReader

        stage_cfg = stage.config(self.cfg)
        key = (tuple(stage_cfg.image.size), stage.crops(self.cfg, training=False), stage_cfg.image.layout)
        if key not in memo:
            reader = images.stage_reader(self.cfg, stage, training=False)
            if self.in_memory and self.cfg.data.cache_dir is None and len(images):
                reader = MemoryReader(reader, len(images))
            memo[key] = reader
        return memo[key]

    def predict_stage(self, stage: Stage, reader: Reader, images: ImageSet, assignment: dict[int, np.ndarray],
                      tabular: np.ndarray | None = None, adapt: Callable[[FoldModel, np.ndarray], None] | None = None
                      ) -> np.ndarray:
        """(n_images, n_targets) predictions in original units: each row the weighted mean over the fold models
        assigned to it (NaN where none is). `tabular`: NDVI/Height in original units for a stage that reads them.
        `adapt(fold_model, rows)`: changes each fold model (loaded in fp32) before it predicts its rows."""
        n = len(images)
        out, total = np.zeros((n, len(stage.targets))), np.zeros(n)
        for fold, rows in assignment.items():
            rows = np.asarray(rows, dtype=np.int64)
            if len(rows) == 0:
                continue
            fm = self.load(stage, fold, torch.float32 if adapt is not None
                           else getattr(torch, self.cfg.infer.weights_dtype))
            if adapt is not None:
                adapt(fm, rows)
            pred = self.predict_fold(stage, fm, reader, rows, None if tabular is None else tabular[rows])
            if self.check_finite:
                require_finite(pred, f"{self.run.checkpoint(stage, fold)}: {stage.name} fold {fold}"
                               f"{' after infer.ttt fine-tuning' if adapt is not None else ''} predicts",
                               [images.image_paths[r] for r in rows], f" with infer.tta={list(self.tta(stage))}")
            w = 1.0 if self.main_weights is None or stage is not MAIN else float(self.main_weights[fold])
            out[rows] += w * pred
            total[rows] += w
            del fm, pred  # the fold model goes before the next one loads
            gc.collect()
            self.accelerator.free_memory()
            if self.tick is not None:
                self.tick()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total[:, None] > 0, out / np.where(total > 0, total, 1.0)[:, None], np.nan)

    def tta(self, stage: Stage) -> tuple[str, ...]:
        return self.settings.tta if stage is MAIN else ("none",)

    def load(self, stage: Stage, fold: int, dtype: torch.dtype = torch.float32) -> FoldModel:
        """One fold model from its checkpoint, on the accelerator's device, in eval mode."""
        run = self.run
        stage_cfg = stage.config(self.cfg)
        meta = run.checkpoint_info(stage, fold)
        base = meta.get("base_weights")  # a PEFT checkpoint: adapters + head; the backbone from its weights file
        if base is not None:
            path = Path(base["path"])
            if not path.is_file() or path.stat().st_size != base["bytes"]:
                raise BiomassError(f"{run.checkpoint(stage, fold)}: a PEFT checkpoint on the base weights {path}, "
                                   "which is missing or not the file it trained on; put that file there")
            stage_cfg = stage_cfg.model_copy(deep=True)
            stage_cfg.model.backbone["weights"] = str(path)
        model, _ = build_stage_model(stage, stage_cfg, load_weights=base is not None)
        load_checkpoint(model, run.checkpoint(stage, fold), partial=base is not None)
        scalers = meta["scalers"]
        tabular = Scaler.from_dict(scalers["tabular"]) if "tabular" in scalers and uses_tabular(model) else None
        model = model.eval().to(device=self.accelerator.device, dtype=dtype)
        model.target_space.float()  # predictions leave the model in fp32 units whatever the weights' dtype
        return FoldModel(fold, model, tabular)

    def predict_fold(self, stage: Stage, fm: FoldModel, reader: Reader, rows: np.ndarray,
                     tabular: np.ndarray | None) -> np.ndarray:
        """One fold model's (len(rows), n_targets) predictions in original units, TTA views averaged in its raw
        output space. `tabular`: NDVI/Height of the rows in original units (the fold's own scaler standardises)."""
        if fm.tabular is not None:
            if tabular is None or np.isnan(tabular).any():
                raise ConfigError("the main model needs NDVI and Height, which test.csv lacks, and this run has no "
                                  "aux stage to predict them; train with an aux stage or an image_only head")
            tab = fm.tabular.transform(tabular).astype(np.float32)
        else:
            tab = np.zeros((len(rows), 0), np.float32)
        dataset = ImageDataset(lambda i: reader(int(rows[i])), len(rows), tab, None, build_augment([]), 0)
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=self.batch_size or self.cfg.infer.batch_size,
            sampler=EpochSampler(len(rows), 0, False), num_workers=0, pin_memory=torch.cuda.is_available()))
        model, tta = fm.model.eval(), self.tta(stage)

        def forward(batch):
            raw = torch.stack([model(v, batch["tabular"]).float() for v in views(batch["image"], tta)]).mean(0)
            return model.target_space.to_original(model.point(raw))

        pred, index = gather_predictions(self.accelerator, loader, forward)
        if not np.array_equal(index, np.arange(len(rows))):
            raise RuntimeError(f"fold {fm.fold}: inference did not score every image exactly once")
        return pred.astype(np.float64)

    # ------------------------------------------------------------------------------------------------------ ttt
    def test_time_train(self, images: ImageSet, reader: Reader, main: dict[int, np.ndarray], chain: np.ndarray,
                        aux_pred: np.ndarray | None) -> np.ndarray:
        """`infer.ttt`: each main fold model, fine-tuned on its training images + its rows pseudo-labelled with the
        chain's predictions (`chain`, NDVI/Height from the aux stage), predicts those rows again; the folds blend and
        are post-processed as in the chain, and the result is (1 - blend) * chain + blend * fine-tuned."""
        ttt, names = self.settings.ttt, images.image_paths
        main = {k: rows[np.isfinite(chain[rows]).all(axis=1)] for k, rows in main.items()}

        def adapt(fm: FoldModel, rows: np.ndarray) -> None:
            # in name order: the fine-tuning's batches do not depend on how the caller ordered its images (the CV's
            # held-out rows and the same images as a test set then train alike)
            rows = rows[np.argsort([names[r] for r in rows], kind="stable")]
            pseudo = Pseudo(ttt, self.cfg.main, MAIN.seed(self.cfg.seed), reader, rows, chain[rows],
                            None if aux_pred is None else aux_pred[rows])
            fm.model = finetune(self.accelerator, fm.model, fm.tabular, fm.fold, self.labelled, pseudo)

        tuned = self.post(self.predict_stage(MAIN, reader, images, main, aux_pred, adapt))
        return (1.0 - ttt.blend) * chain + ttt.blend * tuned


def require_finite(pred: np.ndarray, who: str, names: Sequence[str], detail: str = "") -> None:
    """Test time: a non-finite prediction is an error naming `who` predicts it and the image (`names[row]`); the
    one check of the submission's values."""
    if np.isfinite(pred).all():
        return
    bad = int(np.flatnonzero(~np.isfinite(pred).all(axis=1))[0])
    raise BiomassError(f"{who} a non-finite value ({pred[bad].tolist()}) for image {names[bad]!r}{detail}; no "
                       "submission written (the checkpoint is damaged or its training diverged: retrain that fold)")


def needs_boxes(cfg: ExperimentConfig) -> bool:
    """Whether the chain frames any stage's images by their crop boxes."""
    return any(s.crops(cfg, training=False) for s in configured(cfg))


__all__ = ["Assignment", "Chain", "ChainSettings", "FoldModel", "fold_weights", "needs_boxes", "postprocess",
           "require_finite", "uses_tabular", "views"]
