"""The engine's pieces: per-fold scalers (log1p in either stage), the validation loss's two averagings, the global
batch split, optimizer and scheduler built from their registry nodes, the seed streams."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biomass.config.load import load_experiment
from biomass.engine import loop
from biomass.engine.build import build_stage_model, make_optimizer, make_scheduler, per_process_batch
from biomass.errors import ConfigError
from biomass.losses import weighted_smooth_l1
from biomass.stages import AUX, MAIN
from helpers import DEMO, GOLD


def cfg(*overrides: str):
    return load_experiment(DEMO, list(overrides)).config


def table(n: int = 12):
    import pandas as pd

    rng = np.random.default_rng(0)
    return pd.DataFrame({"Pre_GSHH_NDVI": rng.uniform(0.2, 0.9, n), "Height_Ave_cm": rng.uniform(1, 40, n),
                         **{t: rng.uniform(0, 50, n) for t in MAIN.targets}})


@pytest.mark.parametrize("stage", [MAIN, AUX])
def test_log1p_targets_work_in_either_stage(stage):
    c = cfg(f"{stage.name}.targets.transform=log1p")
    scalers = loop.fit_scalers(stage, stage.config(c), table(), np.arange(8))
    assert scalers["targets"].log1p
    y = table()[list(stage.targets)].to_numpy()
    np.testing.assert_allclose(scalers["targets"].inverse(scalers["targets"].transform(y)), y, rtol=1e-10)
    assert ("tabular" in scalers) == bool(stage.inputs)


def test_validation_loss_batch_mean_weighs_the_last_batch_as_a_full_one():
    loss = weighted_smooth_l1(1, weights=(1.0,))
    raw = np.array([[0.0], [0.0], [0.0], [0.0], [0.0]], np.float32)
    y = np.array([[1.0], [1.0], [1.0], [1.0], [0.0]], np.float32)  # smooth-L1 per image: .5 .5 .5 .5 0
    assert loop.validation_loss(loss, raw, y, "image", 4) == pytest.approx(0.4)
    assert loop.validation_loss(loss, raw, y, "batch", 4) == pytest.approx((0.5 + 0.0) / 2)


def test_gold_validates_as_the_seed():
    gold = load_experiment(GOLD, ["data.root=/nowhere"]).config
    assert gold.main.train.val_loss_mean == gold.aux.train.val_loss_mean == "batch"
    assert (gold.main.train.eval_batch_size, gold.aux.train.eval_batch_size) == (10, 8)
    assert gold.aux.train.patience == 8 and gold.main.train.patience == 15
    assert [a["name"] for a in gold.aux.augment.train] == ["HorizontalFlip", "VerticalFlip", "RandomRotate90",
                                                           "RandomBrightnessContrast"]
    assert gold.runtime.mixed_precision == "no" and gold.runtime.tf32 is False


def test_global_batch_splits_among_processes():
    assert per_process_batch(16, 2, "train.batch_size") == 8
    with pytest.raises(ConfigError, match="must divide among 3 processes"):
        per_process_batch(16, 3, "train.batch_size")


@pytest.mark.parametrize("optim", ["{name: adamw, lr: 0.01, weight_decay: 0.0}",
                                   "{name: sgd, lr: 0.01, momentum: 0.5}"])
def test_optimizer_and_scheduler_from_their_nodes(optim):
    c = cfg(f"main.optim={optim}", "main.image.size=[32,32]")
    model, _ = build_stage_model(MAIN, c.main)
    opt = make_optimizer(model, c.main, torch.device("cpu"))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    sched = make_scheduler(opt, c.main)
    assert type(sched).__name__ == "CosineAnnealingLR" and sched.T_max == c.main.train.epochs


def test_seed_streams_are_distinct():
    streams = [loop.INIT_STREAM, loop.TRAIN_ORDER_STREAM, loop.VAL_ORDER_STREAM, loop.DROPOUT_STREAM]
    assert len(set(streams)) == 4
    assert MAIN.seed(7) != AUX.seed(7)


@pytest.mark.parametrize("stage", [MAIN, AUX])
def test_validation_loss_is_the_loss_on_the_validation_rows(stage):
    """`val/loss` (which picks the best epoch under `select_by: val_loss` and steps a plateau scheduler) is the loss
    of the fold's own validation predictions against the *validation rows'* targets. The loader's `index` is a
    position in `val_idx`, so targets looked up by it in the whole table would be the first rows' (training rows
    here): the loss then scores the wrong images while `val/score` still looks right."""
    from biomass.engine.build import make_accelerator

    c = cfg("main.image.size=[32,32]", "aux.image.size=[32,32]", "main.train.epochs=1", "aux.train.epochs=1",
            "main.train.batch_size=4", "aux.train.batch_size=4", "main.train.val_loss_mean=image",
            "aux.train.val_loss_mean=image", "main.model.backbone.model_name=resnet10t",
            "aux.model.backbone.model_name=resnet10t")
    stage_cfg, rows = stage.config(c), table(16)
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    train_idx, val_idx = np.arange(8), np.arange(8, 16)
    trainer = loop.FoldTrainer(make_accelerator(c), stage, stage_cfg, fold=0, seed=0)
    result = trainer.fit(loop.FoldData(rows, lambda i: images[i], train_idx, val_idx))

    scaler = loop.fit_scalers(stage, stage_cfg, rows, train_idx)["targets"]
    y_val = scaler.transform(rows[list(stage.targets)].to_numpy(np.float64)[val_idx]).astype(np.float32)
    raw = scaler.transform(result.predictions).astype(np.float32)  # SmoothL1 predicts its raw output itself
    expected = loop.validation_loss(trainer.loss_fn, raw, y_val, "image", 8)
    assert result.history[0]["val/loss"] == pytest.approx(expected, rel=1e-4)
