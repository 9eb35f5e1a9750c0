"""`runtime.compile`: the engine torch.compiles the prepared model; checkpoints keep the plain model's keys."""
from __future__ import annotations


import torch
from helpers import DEMO, eager_compile
from safetensors.torch import load_file, load_model

from biomass.config.load import load_experiment
from biomass.engine.build import maybe_compile, unwrap
from biomass.engine.checkpoint import load_state, save_checkpoint, save_state
from biomass.engine.build import build_stage_model
from biomass.stages import MAIN

SMALL = ["main.image.size=[32,32]", "main.model.backbone.model_name=test_resnet", "aux=null"]


def stage():
    return load_experiment(DEMO, ["data.root=.", *SMALL]).config.main


def plain_model():
    torch.manual_seed(0)
    return build_stage_model(MAIN, stage(), load_weights=False)[0]


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
