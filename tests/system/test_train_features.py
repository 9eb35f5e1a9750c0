"""Features checked by training through the real entry point (tiny, on a CPU): the decoded-image cache,
torch.compile, the winners' components together."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from helpers import eager_compile, npy_files, train
from safetensors.torch import load_file, load_model

from biomass.config.load import load_yaml, validate
from biomass.engine.build import build_stage_model
from biomass.stages import MAIN

EXTRA = ["aux=null", "main.folds.train_folds=[0]", "tracking.mlflow=false", "main.train.epochs=1",
         "main.model.backbone.model_name=test_resnet"]


def test_training_with_the_cache_gives_the_same_oof(tmp_path, monkeypatch):
    """One fold, one epoch of the real training entry point, with and without data.cache_dir."""
    from biomass.data.synthetic import generate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = generate(tmp_path / "data", n_train=9, n_test=1, seed=1, width=128, height=64)
    a = train(tmp_path / "a", data, *EXTRA)
    b = train(tmp_path / "b", data, *EXTRA, f"data.cache_dir={tmp_path / 'cache'}")
    assert len(npy_files(tmp_path / "cache")) == 1
    assert len(pd.read_csv(a / "oof.csv")) > 0 and (a / "oof.csv").read_bytes() == (b / "oof.csv").read_bytes()


def test_training_with_compile_writes_plain_checkpoints(tmp_path, monkeypatch):
    from biomass.data.synthetic import generate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = generate(tmp_path / "data", n_train=9, n_test=1, seed=1, width=128, height=64)
    a = train(tmp_path / "a", data, *EXTRA)
    compiled = eager_compile(monkeypatch)
    b = train(tmp_path / "b", data, *EXTRA, "runtime.compile=true")
    assert len(compiled) == 1  # one fold trained
    ckpt_a, ckpt_b = (load_file(str(r / "main" / "fold0" / "best.safetensors")) for r in (a, b))
    assert ckpt_a.keys() == ckpt_b.keys() and not any("_orig_mod" in k for k in ckpt_b)
    # the eager backend runs the captured graph op for op: the same training, to the bit
    assert all(torch.equal(ckpt_a[k], ckpt_b[k]) for k in ckpt_a)
    assert (a / "oof.csv").read_bytes() == (b / "oof.csv").read_bytes()


@pytest.mark.slow
def test_training_with_inductor(tmp_path, monkeypatch):
    """The real thing: inductor (C++ on a CPU, a minute or more). Its kernels round and draw dropout differently,
    so the predictions are close to the eager run's, not equal; the checkpoint loads into a plain model."""
    from biomass.data.synthetic import generate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    torch._dynamo.reset()
    data = generate(tmp_path / "data", n_train=9, n_test=2, seed=1, width=128, height=64)
    run = train(tmp_path / "b", data, *EXTRA, "runtime.compile=true")
    ckpt = run / "main" / "fold0" / "best.safetensors"
    assert not any("_orig_mod" in k for k in load_file(str(ckpt)))
    model = build_stage_model(MAIN, validate(load_yaml(run / "config.yaml")).main, load_weights=False)[0]
    load_model(model, str(ckpt))
    oof = pd.read_csv(run / "oof.csv")
    assert oof["target"].notna().all() and len(oof) > 0


def test_winners_components_train_together_and_infer(synthetic_root, tmp_path, monkeypatch):
    """test_vit on halves + cross-view attention, three blocks pooled by multi_stat, the ratio head, LoRA on a base
    weights file, EMA, LLRD and a one-epoch head warm-up: trains on the tiny rendered demo, and the deployable CV
    (biomass.chain) rebuilds each fold model from its partial checkpoint plus the base weights."""
    from safetensors.torch import save_file

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    torch.manual_seed(0)
    base = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit", num_classes=0, img_size=(32, 32))
               .state_dict().items()}, str(base))
    backbone = (f"{{name: timm, model_name: test_vit, weights: {base}, out_indices: [-3, -2, -1], "
                "peft: {method: lora, r: 2, alpha: 4, blocks: 2}}")
    run = train(tmp_path / "run", synthetic_root,
                "main.image.layout=halves", f"main.model.backbone={backbone}",
                "main.model.fusion={name: cross_attention, heads: 4}", "main.model.pooling={name: multi_stat}",
                "main.model.head={name: ratio}", "main.train.ema={decay: 0.9}", "main.train.warmup_frozen_epochs=1",
                "main.optim={name: adamw, lr: 1.0e-3, weight_decay: 1.0e-4, layer_decay: 0.8}",
                "main.folds.splitter={name: kfold, n_splits: 2, seed: 0}",
                "aux.folds.splitter={name: kfold, n_splits: 2, seed: 0}", "aux.init_from=null",
                "infer.post=[mass_balance, {clover_scale: 0.8}]")
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["cv/weighted_r2_deployable"])
    state = load_file(str(run / "main" / "fold0" / "best.safetensors"))
    meta = json.loads((run / "main" / "fold0" / "best.json").read_text())
    assert meta["base_weights"]["path"] == str(base)
    assert any(".lora_" in k for k in state) and "head.inner.outputs.0.weight" in state
    assert not any(k.startswith("backbone.model.blocks.0.") for k in state)  # frozen base weights stay in the file
