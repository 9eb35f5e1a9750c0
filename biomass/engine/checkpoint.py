"""Checkpoint I/O: the best epoch's weights + metadata, and the resumable per-epoch training state.

safetensors + JSON, no pickles; every file is written to a temp name and renamed, so a kill leaves the previous
version whole. Where the files live is the RunDir's business (biomass.rundir); this module reads and writes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from biomass.errors import BiomassError
from biomass.places import atomic, read_json, write_json


def frozen_backbone_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the backbone's frozen parameters: what a PEFT checkpoint leaves to the base weights file."""
    return {f"backbone.{n}" for n, p in model.backbone.named_parameters() if not p.requires_grad}


def save_checkpoint(model: torch.nn.Module, path: Path, meta: dict[str, Any], partial: bool = False) -> None:
    """safetensors weights + JSON metadata (scalers, epoch, scores), each written to a temp name then renamed.

    `partial` (PEFT runs with a base weights file): every tensor except the backbone's frozen parameters, i.e. the
    adapters, pooling, fusion, head and buffers; `meta["base_weights"]` names the file the rest comes from."""
    from safetensors.torch import save_file, save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        if partial:
            skip = frozen_backbone_keys(model)
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()
                       if k not in skip}, str(tmp))
        else:
            save_model(model, str(tmp))  # handles the consistent head's shared buffers
    write_json(path.with_suffix(".json"), meta)


def load_checkpoint(model: torch.nn.Module, path: Path, partial: bool = False) -> None:
    """Load a fold checkpoint into a model built from the run's config; a file that does not fit is one error.
    `partial`: the model already holds the base weights; the file must supply every other tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    try:
        if partial:
            result = model.load_state_dict(load_file(str(path), device=str(next(model.parameters()).device)),
                                           strict=False)
            missing = set(result.missing_keys) - frozen_backbone_keys(model)
            if missing or result.unexpected_keys:
                raise RuntimeError(f"{len(missing)} missing (e.g. {sorted(missing)[:1]}), "
                                   f"{len(result.unexpected_keys)} unexpected keys")
        else:
            load_model(model, str(path))
    except (RuntimeError, SafetensorError, OSError) as err:
        raise BiomassError(f"{path}: does not fit the run's config.yaml or is corrupt "
                           f"({str(err).splitlines()[0][:200]})") from None


def backbone_state(path: Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of a fold checkpoint (the aux stage's initialisation)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise BiomassError(f"{path}: cannot be read ({str(err)[:200]})") from None
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def save_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               progress: dict[str, Any], ema=None) -> None:
    """Model, optimizer and scheduler state plus training progress: safetensors + JSON, no pickles. The JSON is
    written last, so a state whose JSON exists is complete (a kill mid-save leaves the previous epoch's JSON)."""
    from safetensors.torch import save_file, save_model

    state_dir.mkdir(parents=True, exist_ok=True)
    epoch = progress["epoch"]
    save_model(model, str(state_dir / f"model-{epoch}.safetensors"))
    if ema is not None:  # train.ema: the averaged weights and the warm-up clock resume too
        save_model(ema.module, str(state_dir / f"ema-{epoch}.safetensors"))
        progress = {**progress, "ema_steps": ema.steps}
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{name}": value.detach().cpu().contiguous() for pid, st in opt["state"].items()
               for name, value in st.items() if isinstance(value, torch.Tensor)}
    save_file(tensors, str(state_dir / f"optimizer-{epoch}.safetensors"))
    meta = {"param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(), "progress": progress}
    write_json(state_dir / "progress.json", meta)
    for old in state_dir.glob("*.safetensors"):  # keep only the epoch the JSON points to
        if not old.stem.endswith(f"-{epoch}"):
            old.unlink(missing_ok=True)


def load_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               ema=None) -> dict:
    """The saved per-epoch state; a truncated, empty or foreign file is one error naming it and the way out."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    fix = f"delete {state_dir} to restart this fold from its first epoch"
    meta = read_json(state_dir / "progress.json", "saved training state", fix)
    try:
        epoch = int(meta["progress"]["epoch"])
        param_groups, scheduler_state = meta["param_groups"], meta["scheduler"]
    except (KeyError, TypeError, ValueError):
        raise BiomassError(f"{state_dir / 'progress.json'}: saved training state is incomplete; {fix}") from None
    device = str(next(model.parameters()).device)
    current = state_dir / f"model-{epoch}.safetensors"
    try:
        load_model(model, str(current), device=device)
        if ema is not None:
            current = state_dir / f"ema-{epoch}.safetensors"
            load_model(ema.module, str(current), device=device)
            ema.steps = meta["progress"].get("ema_steps", 0)
        current = state_dir / f"optimizer-{epoch}.safetensors"
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in load_file(str(current)).items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
        scheduler.load_state_dict(scheduler_state)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as err:
        raise BiomassError(f"{current}: saved training state cannot be read "
                           f"({' '.join(str(err).split())[:150]}); {fix}") from None
    return meta["progress"]
