"""What `biomass.run --dry-run` checks: the config, the models (on the meta device) and the data, training nothing."""
from __future__ import annotations

from pathlib import Path

from biomass.config.load import Experiment, to_yaml
from biomass.config.schema import ExperimentConfig
from biomass.errors import ConfigError
from biomass.stages import configured


def check_models(cfg: ExperimentConfig, dry_run: bool = False) -> list[str]:
    """Build every stage's model on the meta device (no memory, no initialisation) and match each backbone weights
    file by tensor names and shapes, so that `--dry-run` reports an unknown timm model, a component that does not fit
    its backbone or a weights file for another model. (Training finds the same when it builds fold 0's model, after
    the data checks, and records the run as failed.) In a dry run a weights file that is not there is noted
    (returned) rather than an error, as a missing data.root is."""
    import torch

    from biomass.engine.build import build_stage_model
    from biomass.models.backbones import load_weights

    notes = []
    for stage in configured(cfg):
        stage_cfg = stage.config(cfg)
        try:
            with torch.device("meta"):
                model, _ = build_stage_model(stage, stage_cfg, load_weights=False)
            bb = stage_cfg.model.backbone
            if bb["name"] == "timm" and bb.get("weights"):
                weights = Path(bb["weights"])
                if dry_run and not weights.is_file():
                    notes.append(f"{stage.name}.model.backbone.weights {weights} not found; not checked")
                    continue
                load_weights(model.backbone.model, weights, bb.get("strict", True), bb["model_name"],
                             shapes_only=True)
        except ConfigError as err:  # the builders name `model.backbone...`; say which stage
            msg = str(err)
            raise ConfigError(f"{stage.name}.{msg}" if msg.startswith("model.") else f"{stage.name} stage: {msg}") \
                from None
        except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: training's build checks
            continue
    return notes


def dry_run(exp: Experiment) -> str:
    """The resolved config, then one `#` line per check: models, weights files, data."""
    from biomass.data.source import load_train_data

    cfg = exp.config
    lines = [to_yaml(cfg).rstrip("\n")]
    lines += [f"# {note}" for note in check_models(cfg, dry_run=True)]
    if cfg.data.root.is_dir():
        data = load_train_data(cfg)
        boxes = len(data.images.boxes)
        lines.append(f"# data: {len(data.table)} train images in {cfg.data.root} checked ({cfg.data.check_images})"
                     f"{f', {boxes} crop boxes' if boxes else ''}")
    else:
        generated = cfg.data.demo is not None and not exp.from_cli("data.root")
        note = " (the demo data is generated there on first use)" if generated else \
            "; training stops here until it exists"
        lines.append(f"# data: {cfg.data.root} not found; not checked{note}")
    return "\n".join(lines)
