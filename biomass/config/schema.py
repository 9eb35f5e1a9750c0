"""The experiment schema: every knob of an experiment, one pydantic section per config section.

This is the one-hop map of the config: a key here is a key in the YAML. Component nodes (`{name: ..., **kwargs}`)
are typed by their registry; their arguments are checked against the builder's signature in `config.load`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from biomass.constants import IMAGENET_MEAN, IMAGENET_STD
from biomass.registry import (BACKBONES, FUSIONS, HEADS, LOSSES, OPTIMIZERS, POOLINGS, POSTS, SCHEDULERS, SPLITTERS,
                              Registry)


class RegistryRef:
    """Marks a config field as a component node of one registry."""

    def __init__(self, registry: Registry):
        self.registry = registry


def Component(registry: Registry) -> Any:  # noqa: N802 - reads like a type in the schema
    return Annotated[dict[str, Any], RegistryRef(registry)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DemoData(Section):
    """Generate the synthetic demo dataset into `data.root` when that (config-file) root does not exist."""

    n_train: PositiveInt
    n_test: PositiveInt
    seed: int = 0
    width: PositiveInt = 2000
    height: PositiveInt = 1000


class DataConfig(Section):
    root: Path
    train_csv: str = "train.csv"
    test_csv: str = "test.csv"
    crops: str | None = None  # CSV inside root: image_path,x0,y0,x1,y1 (pixel boxes of the original image)
    check_images: Literal["decode", "header"] = "decode"
    num_workers: int = Field(2, ge=0)
    allow_outside_root: bool = False  # image_path rows may leave root (absolute, `..`, symlinks): trust the CSVs
    cache_dir: Path | None = None  # decoded-image cache: crop + resize once, memory-mapped uint8 (see BENCHMARKS)
    demo: DemoData | None = None


class ImageConfig(Section):
    size: tuple[PositiveInt, PositiveInt]  # (height, width) fed to the backbone
    crop: bool = False  # apply data.crops boxes before resizing
    layout: Literal["whole", "halves"] = "whole"  # halves: left and right halves as two views (dual-image input)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class AugmentConfig(Section):
    """albumentations transforms by class name, applied to the resized uint8 image: `{name: HorizontalFlip, p: .5}`.

    Resizing and normalisation are not listed: the loader always resizes to `image.size` first, and normalises with
    `image.mean/std` on the device (see docs/BENCHMARKS.md for why the order is sound).
    """

    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []


class FoldsConfig(Section):
    splitter: Component(SPLITTERS)
    train_folds: list[int] | None = None  # train only these folds (None: all)


class ModelConfig(Section):
    backbone: Component(BACKBONES)
    pooling: Component(POOLINGS)
    head: Component(HEADS)
    fusion: Component(FUSIONS) = {"name": "concat"}  # image.layout=halves: mix and join the two views (models.fusion)
    views_merge: Literal["concat", "mean"] = "concat"  # deprecated alias: `mean` means fusion {name: mean}

    @model_validator(mode="after")
    def _views_merge_alias(self) -> ModelConfig:
        if self.views_merge == "mean" and self.fusion.get("name") == "concat":
            self.fusion = {"name": "mean"}
        return self


class TargetConfig(Section):
    transform: Literal["standard", "log1p"] = "standard"  # log1p: log(1+y) then standardise
    activation: Literal["none", "scaled_sigmoid"] = "none"  # scaled_sigmoid: bounded by the training range


class EmaConfig(Section):
    """An exponential moving average of the weights (timm ModelEmaV3), updated after every optimizer step; the EMA
    weights are what is evaluated, selected and saved."""

    decay: float = Field(0.998, gt=0.0, lt=1.0)
    warmup: bool = False  # timm's EMA warm-up: decay grows from 0 toward `decay` over the first steps


class TrainConfig(Section):
    epochs: PositiveInt
    batch_size: PositiveInt  # global: split across processes
    eval_batch_size: PositiveInt | None = None  # None: 2 x batch_size
    drop_last: bool = True
    patience: PositiveInt | None = None  # early stopping, in epochs without improvement
    select_by: Literal["val_score", "val_loss"] = "val_score"  # val_score: weighted R2 (main), mean R2 (aux)
    # image: the validation loss over all images at once; batch: the mean of per-batch means (the seed's)
    val_loss_mean: Literal["image", "batch"] = "image"
    grad_clip: PositiveFloat | None = None
    grad_accum: PositiveInt = 1
    ema: EmaConfig | None = None
    warmup_frozen_epochs: int = Field(0, ge=0)  # the first N epochs train everything but the backbone (head warm-up)


class StageConfig(Section):
    image: ImageConfig
    augment: AugmentConfig
    folds: FoldsConfig
    model: ModelConfig
    loss: Component(LOSSES)
    targets: TargetConfig = TargetConfig()
    optim: Component(OPTIMIZERS)
    scheduler: Component(SCHEDULERS)
    train: TrainConfig
    init_from: Literal["main/fold0", "main/same_fold"] | None = None  # aux stage: start from a main checkpoint


class TestTimeTraining(Section):
    """`infer.ttt`: fine-tune each main fold on its training images + the chain's pseudo-labels of the images it
    predicts, predict them again and blend (8th place). Runs wherever the chain runs: the submission and the
    deployable CV (on each fold's held-out images), so the CV measures it."""

    epochs: PositiveInt = 2
    blend: float = Field(0.8, ge=0.0, le=1.0)  # final = (1 - blend) * chain + blend * fine-tuned
    lr: PositiveFloat | None = None  # None: a tenth of main.optim.lr


class InferConfig(Section):
    """The aux->main chain's settings, read alike by the deployable CV and by `biomass.infer` (biomass.chain)."""

    crop: Literal["none", "boxes"] = "none"  # boxes: frame each stage's images as it trained (data.crops boxes)
    tta: list[Literal["none", "hflip", "vflip", "hvflip"]] = Field(["none", "hflip", "vflip"], min_length=1)
    fold_weights: Literal["uniform", "cv"] | list[float] = "uniform"
    # post-processing steps in order, before clip: [mass_balance, {clover_scale: 0.8}, ...]
    post: list[Component(POSTS)] = []
    clip: bool = True  # clip predictions at 0 g (after the post steps)

    @model_validator(mode="before")
    @classmethod
    def _mass_balance_alias(cls, data: Any) -> Any:
        """Deprecated `infer.mass_balance: true` = `infer.post: [mass_balance, ...]` (first step). Kept only so that
        run directories written before the knob moved (their config.yaml says `mass_balance: false`) still load."""
        if isinstance(data, dict) and "mass_balance" in data:
            data = dict(data)
            if data.pop("mass_balance"):
                data["post"] = ["mass_balance", *(data.get("post") or [])]
        return data

    @field_validator("post", mode="before")
    @classmethod
    def _post_shorthand(cls, value: Any) -> Any:
        from biomass.post import shorthand

        return [shorthand(v) for v in value] if isinstance(value, list) else value
    batch_size: PositiveInt = 8
    ttt: TestTimeTraining | None = None  # test-time training on pseudo-labels (biomass.ttt); off as in the seed
    weights_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: fold models held in half the memory


class TrackingConfig(Section):
    mlflow: bool = True
    experiment: str | None = None  # MLflow experiment name; None: the config's `name`


class RuntimeConfig(Section):
    # "no" | "bf16" | "fp16": training and inference autocast, over the accelerate launch config's; None: its
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA
    compile: bool = False


class ExperimentConfig(Section):
    name: str
    seed: int = 0
    data: DataConfig
    main: StageConfig
    aux: StageConfig | None = None
    infer: InferConfig = InferConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def dump(self) -> dict[str, Any]:
        """Plain YAML-able dict (paths as strings, tuples as lists)."""
        return plain(self.model_dump(mode="json"))


def plain(obj: Any) -> Any:
    """Tuples as lists, recursively: what YAML and JSON write."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


# The knobs (not registry components) that carry the winning solutions' ideas, listed by `python -m
# biomass.components` beside the registries; a test resolves every path against the schema above. (path in a stage
# config or the experiment, what it does, where it came from)
WINNERS_KNOBS: tuple[tuple[str, str, str], ...] = (
    ("main.model.backbone.out_indices", "intermediate blocks' tokens (timm forward_intermediates)", "6th, 13th"),
    ("main.model.backbone.peft", "LoRA / DoRA adapters on a frozen backbone (peft)", "6th"),
    ("main.image.layout", "halves: the photo's 1:1 halves as two views (with main.model.fusion)", "1st, 9th"),
    ("main.train.ema", "EMA of the weights, evaluated and saved (timm ModelEmaV3)", "1st, 6th, 9th, 10th"),
    ("main.train.warmup_frozen_epochs", "the head trains alone for the first N epochs", "1st, 8th (b)"),
    ("main.optim.layer_decay", "layer-wise LR decay (timm param groups)", "ViT fine-tuning practice"),
    ("main.augment.train", "DateStamp, RedDot, VerticalStripShuffle (biomass.data.augment)", "10th, 3rd"),
    ("infer.post", "post-processing steps (registry post-processing)", "1st, 8th (a), 9th"),
    ("infer.ttt", "test-time training on the chain's pseudo-labels, blended (biomass.ttt)", "8th (a)"),
)

