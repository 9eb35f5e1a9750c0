"""Test-time training (`infer.ttt`, the 8th place's third stage): fine-tune a finished main fold model on its own
training images plus pseudo-labelled images (the chain's predictions for them), then predict those images again.

`biomass.chain.run_chain` runs it after the chain and blends, for test images at inference and for each fold's
held-out images in the deployable CV alike, so the CV measures the effect rather than assuming it. This module only
fine-tunes a model in memory; which images it sees and the blend are the chain's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from biomass.config.schema import ExperimentConfig
from biomass.constants import TABULAR, TARGETS
from biomass.data.images import Reader, draw_seed
from biomass.data.scalers import Scaler
from biomass.data.source import TrainData
from biomass.engine.build import make_loader, make_optimizer, unwrap
from biomass.engine.loop import train_one_epoch
from biomass.metrics import NotScorable
from biomass.models.model import BiomassModel
from biomass.registry import LOSSES
from biomass.stages import MAIN

TTT_STREAM = 5  # the fine-tuning's data order and augmentation (after engine.loop's streams 1-4)


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
    return Labelled(data.stage_reader(cfg.main, cfg.data.cache_dir),
                    data.table[list(TABULAR)].to_numpy(np.float64), data.table[list(TARGETS)].to_numpy(np.float64),
                    {k: np.flatnonzero((ids != k) & (ids >= 0)) for k in folds})


def joined(first: Reader, n_first: int, second: Reader, second_rows: np.ndarray) -> Reader:
    """One reader over `first`'s rows 0..n_first-1, then `second`'s `second_rows`."""
    return lambda i: first(i) if i < n_first else second(int(second_rows[i - n_first]))


def finetune(accelerator: Accelerator, cfg: ExperimentConfig, model: BiomassModel, tabular_scaler: Scaler | None,
             fold: int, labelled: Labelled, pseudo_reader: Reader, pseudo_rows: np.ndarray,
             pseudo_tabular: np.ndarray | None, pseudo_targets: np.ndarray) -> BiomassModel:
    """`infer.ttt.epochs` epochs of main-stage training (its augmentation, loss, batch size and frozen prefix) of a
    loaded fold model on its training images and the pseudo-labelled ones, at `infer.ttt.lr`; no validation, no
    selection (the held-out labels are what it is tested on). Returns the fine-tuned model, in eval mode."""
    ttt, stage_cfg = cfg.infer.ttt, cfg.main
    train_rows = labelled.rows[fold]
    n = len(labelled.targets)
    reader = joined(labelled.reader, n, pseudo_reader, pseudo_rows)
    index = np.concatenate([train_rows, n + np.arange(len(pseudo_rows))])
    targets = np.concatenate([labelled.targets, pseudo_targets]).astype(np.float64)
    with torch.no_grad():
        y_std = model.target_space.to_standard(torch.as_tensor(targets, dtype=torch.float32)).numpy()
    if tabular_scaler is not None:  # the fold's own scaler: the model keeps the input space it trained in
        pseudo = pseudo_tabular if pseudo_tabular is not None else np.full((len(pseudo_rows), 2), np.nan)
        x_tab = tabular_scaler.transform(np.concatenate([labelled.tabular, pseudo])).astype(np.float32)
    else:
        x_tab = np.zeros((len(targets), 0), np.float32)
    loss_fn = LOSSES.build_node(stage_cfg.loss, len(MAIN.targets))
    if hasattr(loss_fn, "bind"):  # interval bins: the fold's, carried by its target space
        loss_fn.bind(model.target_space)
    tuned = stage_cfg.model_copy(deep=True)
    tuned.optim = {**stage_cfg.optim, "lr": ttt.lr if ttt.lr is not None else stage_cfg.optim["lr"] / 10}
    seed = draw_seed(MAIN.seed(cfg.seed), fold, TTT_STREAM)
    loader = make_loader(reader, index, x_tab, y_std, tuned, seed, True, 0, accelerator.num_processes)
    model = model.float().train()
    optimizer = make_optimizer(model, tuned, accelerator.device)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn.to(accelerator.device)
    for epoch in range(ttt.epochs):
        torch.manual_seed(draw_seed(seed, fold, TTT_STREAM, epoch))
        loader.set_epoch(epoch)
        loss = train_one_epoch(accelerator, model, loader, loss_fn, optimizer, tuned)
        if not np.isfinite(loss):
            raise NotScorable(f"infer.ttt: main fold {fold}'s fine-tuning loss is {loss} at epoch {epoch}; "
                              "lower infer.ttt.lr")
    del optimizer, loader
    return unwrap(accelerator, model).eval()


__all__ = ["Labelled", "TTT_STREAM", "finetune", "joined", "labelled_from"]
