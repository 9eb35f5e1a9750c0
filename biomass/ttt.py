"""Test-time training (`infer.ttt`, the 8th place's third stage): fine-tune a finished main fold model on its own
training images plus pseudo-labelled images (the chain's predictions for them), then predict those images again.

`biomass.chain.Chain` runs it after the chain and blends, for test images at inference and for each fold's
held-out images in the deployable CV alike, so the CV measures the effect rather than assuming it. This module only
fine-tunes a model in memory; which images it sees and the blend are the chain's.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch
from accelerate import Accelerator

from biomass.config.schema import ExperimentConfig, StageConfig, TestTimeTraining
from biomass.constants import TABULAR, TARGETS
from biomass.data.images import Reader, draw_seed
from biomass.data.scalers import Scaler
from biomass.data.source import TrainData
from biomass.engine.build import bind_loss, build_loss
from biomass.engine.loop import FoldTrainer
from biomass.metrics import NotScorable
from biomass.models.model import BiomassModel
from biomass.stages import MAIN

TTT_STREAM = 5  # the fine-tuning's root seed: draw_seed(stage seed, fold, TTT_STREAM) (engine.loop has 1-4)


@dataclass(frozen=True)
class Labelled:
    """The training images test-time training mixes in, framed as the main stage trained on them."""

    reader: Reader
    tabular: np.ndarray  # (n, 2) NDVI/Height, original units
    targets: np.ndarray  # (n, 5) grams
    rows: dict[int, np.ndarray]  # main fold -> the rows it trained on


def labelled_from(cfg: ExperimentConfig, data: TrainData, main_fold_ids: np.ndarray, folds: list[int]) -> Labelled:
    """The training table as `Labelled`: main fold k trained on the rows whose fold is neither k nor -1 (an image
    the run did not train on)."""
    ids = np.asarray(main_fold_ids)
    return Labelled(data.images.stage_reader(cfg, MAIN, training=True),
                    data.table[list(TABULAR)].to_numpy(np.float64), data.table[list(TARGETS)].to_numpy(np.float64),
                    {k: np.flatnonzero((ids != k) & (ids >= 0)) for k in folds})


def joined(first: Reader, n_first: int, second: Reader, second_rows: np.ndarray) -> Reader:
    """One reader over `first`'s rows 0..n_first-1, then `second`'s `second_rows`."""
    return lambda i: first(i) if i < n_first else second(int(second_rows[i - n_first]))


def finetune(accelerator: Accelerator, model: BiomassModel, tabular_scaler: Scaler | None, fold: int,
             labelled: Labelled, pseudo: Pseudo) -> BiomassModel:
    """`infer.ttt.epochs` epochs of main-stage training (its augmentation, loss, batch size and frozen prefix) of a
    loaded fold model on its training images and the pseudo-labelled ones, at `infer.ttt.lr`; no validation, no
    selection (the held-out labels are what it is tested on). The fold's `FoldTrainer` does the work, with its
    own root seed. Returns the fine-tuned model, in eval mode."""
    ttt, stage_cfg = pseudo.settings, pseudo.stage_cfg
    train_rows = labelled.rows[fold]
    n = len(labelled.targets)
    reader = joined(labelled.reader, n, pseudo.reader, pseudo.rows)
    index = np.concatenate([train_rows, n + np.arange(len(pseudo.rows))])
    targets = np.concatenate([labelled.targets, pseudo.targets]).astype(np.float64)
    with torch.no_grad():
        y_std = model.target_space.to_standard(torch.as_tensor(targets, dtype=torch.float32)).numpy()
    if tabular_scaler is not None:  # the fold's own scaler: the model keeps the input space it trained in
        tab = pseudo.tabular if pseudo.tabular is not None else np.full((len(pseudo.rows), 2), np.nan)
        x_tab = tabular_scaler.transform(np.concatenate([labelled.tabular, tab])).astype(np.float32)
    else:
        x_tab = np.zeros((len(targets), 0), np.float32)
    tuned = stage_cfg.model_copy(deep=True)
    tuned.optim = {**stage_cfg.optim, "lr": ttt.lr if ttt.lr is not None else stage_cfg.optim["lr"] / 10}
    trainer = FoldTrainer(accelerator, MAIN, tuned, fold, draw_seed(pseudo.stage_seed, fold, TTT_STREAM))
    loss_fn = build_loss(MAIN, tuned)
    bind_loss(loss_fn, model.target_space)  # interval bins: the fold's, carried by its target space
    trainer.setup(model.float(), loss_fn, trainer.loader(reader, index, x_tab, y_std, True), fine_tune=True)
    for epoch in range(ttt.epochs):
        try:
            trainer.train_epoch(epoch)
        except NotScorable:
            raise NotScorable(f"infer.ttt: main fold {fold}'s fine-tuning loss is nan or inf at epoch {epoch}; "
                              "lower infer.ttt.lr") from None
    return trainer.plain_model.eval()


@dataclass(frozen=True)
class Pseudo:
    """The pseudo-labelled half of one fold's fine-tuning: its rows of the image set, their reader, the chain's
    predictions for them (`targets`, grams) and NDVI/Height from the aux stage (`tabular`, or None)."""

    settings: TestTimeTraining
    stage_cfg: StageConfig
    stage_seed: int
    reader: Reader
    rows: np.ndarray
    targets: np.ndarray
    tabular: np.ndarray | None


__all__ = ["Labelled", "Pseudo", "TTT_STREAM", "finetune", "joined", "labelled_from"]
