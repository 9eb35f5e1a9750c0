"""Config -> the objects one fold trains with: model + loss, optimizer, scheduler (the loaders: `FoldTrainer.loader`).

Each component node is built by one call, `Registry.build_node(node, *context)`; runtime context (image size,
feature spec, dims, epochs, device) is passed positionally, config values as keywords.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator

import biomass.components  # noqa: F401  (fills the registries this module builds from)
from biomass.config.schema import ExperimentConfig, StageConfig
from biomass.errors import ConfigError
from biomass.models.model import BiomassModel, TargetSpace
from biomass.registry import BACKBONES, FUSIONS, HEADS, LOSSES, OPTIMIZERS, POOLINGS, SCHEDULERS
from biomass.stages import Stage


def make_accelerator(cfg: ExperimentConfig) -> Accelerator:
    """The run's Accelerator: `runtime.mixed_precision` over the launch config's, and TF32 exactly as
    `runtime.tf32` says (cuDNN enables it by default; the seed ran without)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.runtime.tf32
        torch.backends.cudnn.allow_tf32 = cfg.runtime.tf32
    precision = cfg.runtime.mixed_precision
    return Accelerator() if precision is None else Accelerator(mixed_precision=precision)


def build_stage_model(stage: Stage, cfg: StageConfig, load_weights: bool = True
                      ) -> tuple[BiomassModel, torch.nn.Module]:
    """A stage's model and loss: the loss decides how many raw outputs each target gets (quantiles: several) and
    which one is the prediction. `load_weights=False` skips the backbone weights file (a fold checkpoint holds the
    whole model; the meta-device dry run reads no data)."""
    n_targets = len(stage.targets)
    loss = build_loss(stage, cfg)
    size = tuple(cfg.image.size)
    backbone_node = dict(cfg.model.backbone)
    if not load_weights:
        backbone_node.update(weights=None, pretrained=False)
    backbone = BACKBONES.build_node(backbone_node, size)
    pooling = POOLINGS.build_node(cfg.model.pooling, backbone.spec)
    fusion = (FUSIONS.build_node(cfg.model.fusion, backbone.spec, pooling.out_dim) if cfg.image.layout == "halves"
              else None)
    in_features = fusion.out_dim(pooling.out_dim) if fusion is not None else pooling.out_dim
    target_space = TargetSpace(n_targets, bins=getattr(loss, "bins", 0))
    head = HEADS.build_node(cfg.model.head, in_features, len(stage.inputs), n_targets * loss.outputs_per_target,
                            target_space)
    bind_loss(loss, target_space)
    model = BiomassModel(backbone, pooling, head, target_space, cfg.targets.activation, cfg.image.mean,
                         cfg.image.std, cfg.image.layout, fusion, loss.point)
    return model, loss


def build_loss(stage: Stage, cfg: StageConfig) -> torch.nn.Module:
    return LOSSES.build_node(cfg.loss, len(stage.targets))


def bind_loss(loss: torch.nn.Module, target_space: TargetSpace) -> None:
    """A loss that reads the fold's fitted values (interval bins) from the model's target space gets it."""
    if hasattr(loss, "bind"):
        loss.bind(target_space)


def per_process_batch(global_batch: int, num_processes: int, key: str) -> int:
    """`train.batch_size` is the global batch: N processes take batch/N each, so the optimisation (steps, images
    per step, learning rate) is the same whatever the process count."""
    if global_batch % num_processes:
        raise ConfigError(f"{key}={global_batch} is the global batch and must divide among {num_processes} processes")
    return global_batch // num_processes


def eval_batch_size(cfg: StageConfig, num_processes: int) -> int:
    """Evaluation batches only bound memory: round up instead of insisting on divisibility."""
    return max(1, -(-(cfg.train.eval_batch_size or 2 * cfg.train.batch_size) // num_processes))


def make_optimizer(model: torch.nn.Module, cfg: StageConfig, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS.build_node(cfg.optim, model, device)  # the builder takes the trainable parameters


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: StageConfig):
    return SCHEDULERS.build_node(cfg.scheduler, optimizer, cfg.train.epochs)


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`runtime.compile`: torch.compile the model accelerate prepared, i.e. after any DDP wrap, where accelerate's
    own dynamo plugin compiles; a model accelerate compiled already (its dynamo config) is returned as it is.

    Not the plugin itself: it lives in accelerate's process-wide state, fixed by the first Accelerator, so it could
    not follow one experiment's config when several run in a process. Checkpoints are written from
    `unwrap(accelerator, model)`, the plain module, so their keys carry no `_orig_mod.` prefix.
    """
    from accelerate.utils import is_compiled_module

    if not enabled or is_compiled_module(model):
        return model
    return torch.compile(model)


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers: its state_dict keys are the model's own."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)
