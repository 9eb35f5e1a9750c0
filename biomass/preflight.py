"""What `biomass.run --dry-run` checks: the config, the models (on the meta device) and the data, training nothing."""
from __future__ import annotations

from pathlib import Path

from biomass.config.load import Experiment, to_yaml
from biomass.config.schema import ExperimentConfig
from biomass.errors import ConfigError
from biomass.stages import configured


def check_models(cfg: ExperimentConfig) -> list[str]:
    """Build every stage's model on the meta device (no memory, no initialisation) and match each backbone weights
    file by tensor names and shapes (from the file's header or a memory-mapped load: no tensor is read), so that
    `--dry-run` reports an unknown timm model, a component that does not fit its backbone, a weights file that is
    not there, or one for another model (naming the first key that does not fit)."""
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
                if not weights.is_file():
                    raise ConfigError(f"{stage.name}.model.backbone.weights: {weights} not found")
                load_weights(model.backbone.model, weights, bb.get("strict", True), bb["model_name"],
                             shapes_only=True)
        except ConfigError as err:  # the builders name `model.backbone...`; say which stage
            msg = str(err)
            if msg.startswith(f"{stage.name}."):
                raise
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
    lines += [f"# {note}" for note in check_models(cfg)]
    if not cfg.data.root.is_dir() and (cfg.data.demo is None or exp.from_cli("data.root")):
        raise ConfigError(f"data.root: {cfg.data.root} does not exist (or is not a directory)")
    if cfg.data.root.is_dir():
        data = load_train_data(cfg)
        boxes = len(data.images.boxes)
        lines.append(f"# data: {len(data.table)} train images in {cfg.data.root} checked ({cfg.data.check_images})"
                     f"{f', {boxes} crop boxes' if boxes else ''}")
    else:
        lines.append(f"# data: {cfg.data.root} not found; the demo data is generated there on first use")
    return "\n".join(lines)
