"""`runtime.compile`: the engine torch.compiles the prepared model; checkpoints keep the plain model's keys."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, load_model

from biomass.config.load import load_experiment, load_yaml, validate
from biomass.engine.build import maybe_compile, unwrap
from biomass.engine.checkpoint import load_state, save_checkpoint, save_state
from biomass.engine.build import build_stage_model
from biomass.stages import MAIN

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
SMALL = ["main.image.size=[32,32]", "main.model.backbone.model_name=test_resnet", "aux=null"]


def stage():
    return load_experiment(DEMO, ["data.root=.", *SMALL]).config.main


def plain_model():
    torch.manual_seed(0)
    return build_stage_model(MAIN, stage(), load_weights=False)[0]


def eager_compile(monkeypatch) -> list:
    """torch.compile with the `eager` backend (dynamo's graph capture and the OptimizedModule wrapper, without
    inductor's minutes of C++ compilation on a CPU); returns the list of compiled modules."""
    compiled, real = [], torch.compile

    def fake(model, **kwargs):
        compiled.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", fake)
    return compiled


def test_maybe_compile_and_unwrap(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import is_compiled_module

    compiled = eager_compile(monkeypatch)
    accelerator = Accelerator()
    model = plain_model()
    keys = set(model.state_dict())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    prepared, optimizer = accelerator.prepare(model, optimizer)
    assert maybe_compile(prepared, False) is prepared and not compiled
    net = maybe_compile(prepared, True)
    assert is_compiled_module(net) and len(compiled) == 1
    assert maybe_compile(net, True) is net and len(compiled) == 1  # never twice (accelerate's dynamo config)
    assert all(k.startswith("_orig_mod.") for k in net.state_dict())  # what a naive save would write
    assert unwrap(accelerator, net) is model and set(unwrap(accelerator, net).state_dict()) == keys

    net.train()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    net(x, torch.zeros(4, 2)).sum().backward()
    optimizer.step()
    save_checkpoint(unwrap(accelerator, net), tmp_path / "best.safetensors", {"epoch": 0})
    assert set(load_file(str(tmp_path / "best.safetensors"))) <= keys
    fresh = plain_model()
    load_model(fresh, str(tmp_path / "best.safetensors"))  # strict
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    save_state(tmp_path / "state", unwrap(accelerator, net), optimizer, sched, {"epoch": 0})
    assert not any(k.startswith("_orig_mod.") for k in load_file(str(tmp_path / "state" / "model-0.safetensors")))
    assert load_state(tmp_path / "state", unwrap(accelerator, net), optimizer, sched) == {"epoch": 0}
    accelerator.free_memory()


from helpers import train  # noqa: E402


EXTRA = ["aux=null", "main.folds.train_folds=[0]", "tracking.mlflow=false", "main.train.epochs=1",
         "main.model.backbone.model_name=test_resnet"]


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
