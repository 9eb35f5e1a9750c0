"""What `biomass.run --dry-run` checks: the config, the models (on the meta device) and the data, training nothing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biomass.config.load import Experiment, to_yaml
from biomass.config.schema import ExperimentConfig, StageConfig
from biomass.errors import ConfigError
from biomass.stages import Stage, configured


def head_has_batchnorm(model) -> bool:
    import torch

    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.head.modules())


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


@dataclass(frozen=True)
class ModelFacts:
    """What the meta-device build of a stage's model tells the rest of the run, so nobody builds it again."""

    batchnorm_head: bool  # a batch of one image cannot train (check_batches)
    reads_tabular: bool  # the head reads NDVI/Height (the deployable chain then needs an aux stage)


def check_models(cfg: ExperimentConfig, num_processes: int = 1) -> dict[Stage, ModelFacts]:
    """Build every stage's model on the meta device once (no memory, no initialisation), match each backbone
    weights file by tensor names and shapes (from the file's header or a memory-mapped load: no tensor is read), and
    run one training-mode forward pass of a batch at the configured size (`check_forward`), so that an unknown timm
    model, `model_kwargs` the model does not take, a component that does not fit its backbone, an image size the
    model cannot take, a weights file that is not there or one for another model (naming the first key that does
    not fit) is one error naming the key before any training step. Any failure to build is an error: `--dry-run`
    is strict. Called by `--dry-run` and by training before its first fold; returns each stage's `ModelFacts`."""
    import torch

    from biomass.chain import uses_tabular
    from biomass.engine.build import build_stage_model
    from biomass.weights import load_into, weights_file

    facts = {}
    for stage in configured(cfg):
        stage_cfg = stage.config(cfg)
        bb = stage_cfg.model.backbone
        try:
            try:
                with torch.device("meta"):
                    model, _ = build_stage_model(stage, stage_cfg, load_weights=False)
            except ConfigError:
                raise
            except Exception as err:  # noqa: BLE001 - timm or a builder refused the arguments
                hint = f"; check {stage.name}.model.backbone.model_kwargs" if bb.get("model_kwargs") else ""
                raise ConfigError(f"{stage.name}.model: the model cannot be built ({_first_line(err)}){hint}") \
                    from None
            if bb["name"] == "timm" and bb.get("weights"):
                weights = weights_file(bb["weights"])  # `packaged:NAME` is converted (once) here
                if not weights.is_file():
                    raise ConfigError(f"{stage.name}.model.backbone.weights: {weights} not found")
                target = model.backbone.model
                if bb.get("peft"):  # adapters rename the wrapped layers: check the file against the bare backbone
                    from biomass.registry import BACKBONES

                    with torch.device("meta"):
                        target = BACKBONES.build_node({**bb, "peft": None, "weights": None},
                                                      tuple(stage_cfg.image.size)).model
                load_into(target, weights, bb.get("strict", True), bb["model_name"], shapes_only=True)
            check_forward(stage, stage_cfg, model, num_processes)
        except ConfigError as err:  # the builders name `model.backbone...`; say which stage
            msg = str(err)
            prefixed = msg.startswith((f"{stage.name}.", f"{stage.name} stage", f"{stage.name}:"))
            raise ConfigError(msg if prefixed else f"{stage.name}.{msg}" if msg.startswith("model.")
                              else f"{stage.name} stage: {msg}") from None
        facts[stage] = ModelFacts(head_has_batchnorm(model), uses_tabular(model))
    return facts


def check_forward(stage: Stage, stage_cfg: StageConfig, model, num_processes: int = 1) -> None:
    """One training-mode forward pass of a per-process training batch on the meta device (shapes only, no memory):
    an image size a ViT cannot take (not a multiple of its patch), a head that does not fit, or a batch too small
    for BatchNorm shows here, before training. Only an operation the meta device has no kernel for
    (NotImplementedError) is left to training, which runs it for real."""
    import torch

    batch = max(1, stage_cfg.train.batch_size // num_processes)
    if batch < 2 and head_has_batchnorm(model):
        raise ConfigError(f"{stage.name}.train.batch_size={stage_cfg.train.batch_size}: the "
                          f"{stage_cfg.model.head['name']!r} head has BatchNorm, which cannot train on a batch of 1 "
                          f"image{f' per process ({num_processes} processes)' if num_processes > 1 else ''}; use at "
                          "least 2")
    h, w = stage_cfg.image.size
    width = 2 * w if stage_cfg.image.layout == "halves" else w
    try:
        image = torch.zeros((batch, 3, h, width), dtype=torch.uint8, device="meta")
        tabular = torch.zeros((batch, len(stage.inputs)), device="meta")
        model.train()
        model(image, tabular)
    except NotImplementedError:
        return
    except Exception as err:  # noqa: BLE001 - any other failure of the forward pass is the config's
        raise ConfigError(f"{stage.name}.image.size={[h, w]}: a forward pass of a batch of {batch} at this size "
                          f"fails in the {stage_cfg.model.backbone.get('model_name', '')} model "
                          f"({_first_line(err)})") from None


def check_batches(cfg: ExperimentConfig, fold_ids: dict[Stage, np.ndarray], facts: dict[Stage, ModelFacts],
                  num_processes: int = 1) -> None:
    """With the folds known (training start): no fold's last training batch holds a single image when the head has
    BatchNorm (drop_last false, or a fold with no more images than one batch). `facts`: check_models' answers."""
    from biomass.rundir import folds_to_train

    for stage, ids in fold_ids.items():
        stage_cfg = stage.config(cfg)
        if not facts[stage].batchnorm_head:
            continue
        batch = stage_cfg.train.batch_size // max(1, num_processes)
        for k in folds_to_train(stage_cfg, ids):
            n = int((np.asarray(ids) != k).sum())
            dropped = stage_cfg.train.drop_last and n > batch
            if n == 1 or (not dropped and n % batch == 1):
                raise ConfigError(f"{stage.name}.train: fold {k} has {n} training images, so with batch_size "
                                  f"{stage_cfg.train.batch_size} its last batch holds 1 image, which the "
                                  f"{stage_cfg.model.head['name']!r} head's BatchNorm cannot train on; set "
                                  f"{stage.name}.train.drop_last=true or change {stage.name}.train.batch_size")


def check_outputs(cfg: ExperimentConfig, run_dir: Path | None = None, resume: bool = False,
                  run_folder: bool = True) -> None:
    """Every place the run will write, checked before any work: the run directory (or `runs/<name>`), the image
    cache, the MLflow store."""
    from biomass.places import require_writable
    from biomass.rundir import RunDir

    if resume:
        require_writable(run_dir, "run directory")
    elif run_folder:
        RunDir.check_place(cfg.name, run_dir)
    if cfg.data.cache_dir is not None:
        require_writable(cfg.data.cache_dir, "data.cache_dir")
    if cfg.tracking.mlflow:
        from biomass.tracking import check_store, tracking_uri

        check_store(tracking_uri())


def check_inputs(cfg: ExperimentConfig, root_from_cli: bool) -> None:
    """What would make a run fail at its first step, without building anything: a missing data root (unless the
    demo data is generated there; never into a root given on the command line) or backbone weights file. Run by
    `--dry-run` and by a sweep for each of its variants."""
    if not cfg.data.root.is_dir() and (cfg.data.demo is None or root_from_cli):
        raise ConfigError(f"data.root: {cfg.data.root} does not exist (or is not a directory)")
    from biomass.weights import weights_file

    for stage in configured(cfg):
        weights = stage.config(cfg).model.backbone.get("weights")
        if weights and not weights_file(weights).is_file():
            raise ConfigError(f"{stage.name}.model.backbone.weights: {weights} not found")


def dry_run(exp: Experiment) -> str:
    """The resolved config, then one `#` line per check: models, weights files, data."""
    from biomass.data.source import load_train_data

    cfg = exp.config
    check_outputs(cfg, run_folder=False)
    lines = [to_yaml(cfg).rstrip("\n")]
    check_inputs(cfg, exp.from_cli("data.root"))
    facts = check_models(cfg)
    lines += [f"# {stage.name}: model built on the meta device and a forward pass checked" for stage in facts]
    if cfg.data.root.is_dir():
        data = load_train_data(cfg)
        boxes = len(data.images.boxes)
        lines.append(f"# data: {len(data.table)} train images in {cfg.data.root} checked ({cfg.data.check_images})"
                     f"{f', {boxes} crop boxes' if boxes else ''}")
    else:
        lines.append(f"# data: {cfg.data.root} not found; the demo data is generated there on first use")
    return "\n".join(lines)
